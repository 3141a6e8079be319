"""One WARNING when ``generate()`` runs a model compiled with rotatek without its compiled forward.

Two ways of compiling reach ``generate()`` with nothing compressed and nothing said, because the
backend is never called:

- ``torch.compile(model, backend="rotatek").generate(...)``: ``generate`` is looked up on the
  wrapped module, and calls the *uncompiled* forward;
- ``model.compile(backend="rotatek")`` on a model whose own ``generate()`` calls an inner
  model's ``generate()`` (BLIP-2, InstructBLIP, Kosmos-2, Qwen2.5-Omni): the outer forward, the
  compiled one, never runs.

Importing this package (torch does when it looks the backend up) wraps transformers'
``GenerationMixin.generate`` with :func:`_warn_if_uncompiled`, which only reads: the model, and the
locals of the frames that called ``generate`` (where the compiled wrapper or the outer model is).
It never changes what ``generate`` does. A model compiled with rotatek itself costs one attribute
walk per call. The wrapper or outer model is found where a calling frame holds it in a variable
(``compiled.generate(...)``, an outer model's own ``generate()``) or in an attribute of one
(``self.compiled.generate(...)``); deeper than that nothing is said, as before.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
import weakref
from typing import Any, Optional

import torch

logger = logging.getLogger("rotatek_compile")

# frames above ``generate`` searched for the compiled wrapper or the outer model: the caller, and
# the decorators (``torch.no_grad``) an outer ``generate`` may sit under
_CALLER_FRAMES = 4
# links from a Dynamo context's callback to the backend it was given (torch 2.11-2.13)
_BACKEND_LINKS = ("_torchdynamo_orig_backend", "compiler_fn", "__wrapped__")

_warned: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def install() -> None:
    """Wrap ``GenerationMixin.generate`` once (idempotent)."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    if getattr(original, "_rotatek_checked", False):
        return

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # generate() itself traced: nothing to read frames for
            _warn_if_uncompiled(self, sys._getframe(1))
        return original(self, *args, **kwargs)

    generate._rotatek_checked = True
    GenerationMixin.generate = generate


def _warn_if_uncompiled(model: torch.nn.Module, caller: Any) -> None:
    if model in _warned or uses_rotatek(model):
        return
    reason = _bypass(model, caller)
    if reason is not None:
        _warned.add(model)
        logger.warning("rotatek: compression is off for every layer of %s: %s", type(model).__name__, reason)


def _bypass(model: torch.nn.Module, caller: Any) -> Optional[str]:
    """Why ``model.generate`` runs uncompiled although a caller compiled it (or its outer model)
    with rotatek, or ``None``."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame, depth = caller, 0
    while frame is not None and depth < _CALLER_FRAMES:
        for value in _held_by(frame):
            if isinstance(value, OptimizedModule) and value._orig_mod is model and uses_rotatek(value):
                return ("torch.compile(model).generate() runs the uncompiled model (generate is looked up on "
                        "the wrapped module); compile in place with model.compile(backend='rotatek', ...)")
            if (isinstance(value, torch.nn.Module) and value is not model and not isinstance(value, OptimizedModule)
                    and uses_rotatek(value) and any(inner is model for inner in value.modules())):
                outer, inner = type(value).__name__, type(model).__name__
                if frame.f_locals.get("self") is not value:  # called directly, not by the outer model
                    return (f"it is part of {outer}, which is compiled with rotatek, but {inner}.generate() runs "
                            f"{inner}'s own forward, uncompiled")
                return (f"{outer}.generate() calls its inner {inner}.generate(), which runs uncompiled; compiling "
                        "that inner model instead compresses its prompt span (the image is merged before it, so "
                        "the span is the prompt less its last query_window tokens, not the image tokens alone)")
        frame, depth = frame.f_back, depth + 1
    return None


def _held_by(frame: Any) -> list:
    """The frame's local values, and the attributes of those that are plain objects (a server's
    ``self.compiled``): modules, classes and functions are not opened."""
    values = list(frame.f_locals.values())
    for value in list(values):
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict) and not isinstance(value, (torch.nn.Module, type, types.ModuleType,
                                                                    types.FunctionType, types.MethodType)):
            values.extend(attributes.values())
    return values


def uses_rotatek(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled (``module.compile`` or ``torch.compile``) with the rotatek
    backend: the Dynamo context's callback, followed back to the backend it was given."""
    context = _dynamo_context(module)
    if context is None:
        return False
    from rotatek_compile.backend import RotateKBackend, rotatek_backend

    seen, todo = set(), [getattr(context, "callback", None)]
    while todo:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        if (link is rotatek_backend or isinstance(link, RotateKBackend)
                or getattr(link, "compiler_name", None) == "rotatek"):
            return True
        todo.extend(getattr(link, name, None) for name in _BACKEND_LINKS)
    return False


def _dynamo_context(module: torch.nn.Module) -> Any:
    from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext

    if isinstance(module, OptimizedModule):
        return module.dynamo_ctx
    compiled = getattr(module, "_compiled_call_impl", None)  # set by nn.Module.compile
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(contents, _TorchDynamoContext):
            return contents
    return None
