"""A Triton kernel module for the tests: on a machine without CUDA, decorated under Triton's CPU
interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set around the import alone and
the process environment is left as found; a module imported earlier without it (by another test
module) is decorated again. Triton's own modules are imported before it is set: Triton's library
functions must be decorated as on a GPU machine (the interpreter imports ``triton.experimental.gluon``
at the first launch, which refuses library functions decorated for the interpreter).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch


def kernel_module(name: str) -> ModuleType:
    """``rotatek_compile.kernels.<name>``, runnable here (the calling test module is skipped if not)."""
    import triton  # noqa: F401  (see the module docstring)
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:  # a Triton without it
        pass
    set_interpret = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
    if set_interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(f"rotatek_compile.kernels.{name}")
        if not torch.cuda.is_available() and not module.INTERPRETED:
            if os.environ.get("TRITON_INTERPRET") != "1":
                pytest.skip("no CUDA, and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
            module = importlib.reload(module)
    finally:
        if set_interpret:
            del os.environ["TRITON_INTERPRET"]
    return module
