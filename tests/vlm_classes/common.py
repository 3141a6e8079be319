"""Helpers shared by the part files: classes and configs looked up lazily, by name.

A part file must import on every supported transformers (5.17 →), so a class that an older release
lacks is named here and looked up only when the model is built; the harness then skips that class
with "not in transformers X" (:class:`NotInTransformers`).
"""

from __future__ import annotations

import importlib
from typing import Any

import transformers


class NotInTransformers(ImportError):
    """The installed transformers lacks a class (or module) that a tiny model needs."""


def tf_class(name: str, module: str = "") -> Any:
    """``transformers.<name>``, or ``transformers.models.<module>.<name>`` when ``module`` is given.

    Raises :class:`NotInTransformers` when the installed release does not have it.
    """
    try:
        where = importlib.import_module(f"transformers.models.{module}") if module else transformers
        return getattr(where, name)
    except (ImportError, AttributeError) as error:
        raise NotInTransformers(f"{module + '.' if module else ''}{name} is not in transformers "
                                f"{transformers.__version__}") from error


class LazyClass:
    """A model class named by string, resolved at build time: ``LazyClass("AriaForConditionalGeneration")``.

    Usable as :attr:`TinyModel.model_class` (``model_class(config)`` builds the model); ``__name__``
    is the class name without importing it. ``eager`` names the configs (``""``: the top one,
    ``"vision_config"``, ...) whose modules have no SDPA implementation: they get eager attention,
    as ``from_pretrained`` would pick for them by default.
    """

    def __init__(self, name: str, module: str = "", eager: tuple[str, ...] = ()):
        self.__name__ = name
        self.module = module
        self.eager = eager

    def resolve(self) -> type:
        return tf_class(self.__name__, self.module)

    def __call__(self, config):
        for sub in self.eager:
            (getattr(config, sub) if sub else config)._attn_implementation = "eager"
        return self.resolve()(config)

    def __repr__(self) -> str:
        return f"LazyClass({self.__name__!r})"


def class_name(model_class: Any) -> str:
    return getattr(model_class, "__name__", repr(model_class))


def not_in_transformers(error: BaseException) -> bool:
    """A build error that means "the installed transformers lacks this model"."""
    if isinstance(error, NotInTransformers):
        return True
    return isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("transformers.")
