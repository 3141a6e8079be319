"""The name of HF's cache argument and output field: ``past_key_values`` up to transformers 5.23,
``cache`` from 5.24 (where the old name still works, with a deprecation warning, until 5.40)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from transformers.generation.utils import GenerationMixin


def _cache_kwarg() -> str:
    # generate() builds every forward call's keywords here, under the name the models take
    # (inspect follows the deprecation wrapper to the function itself)
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_KWARG: str = _cache_kwarg()
_NAMES = ("cache", "past_key_values")  # an output's cache field, the newer name first


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``cache`` as the keyword a model's forward or ``generate()`` takes it by."""
    return {CACHE_KWARG: cache}


def output_cache(out: Any) -> Any:
    """The cache a model or ``generate()`` output holds (``None`` if it holds none), read under the
    name the output declares: the old name's alias on newer outputs logs the deprecation warning."""
    if dataclasses.is_dataclass(out):  # every ModelOutput
        declared = {field.name for field in dataclasses.fields(out)}
        return next((getattr(out, name) for name in _NAMES if name in declared), None)
    read = out.get if isinstance(out, Mapping) else lambda name: getattr(out, name, None)
    return next((cache for cache in map(read, _NAMES) if cache is not None), None)
