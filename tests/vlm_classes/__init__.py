"""Every image-text-to-text / multimodal-LM class of transformers, as a tiny random-init model.

The registry is split in three part files (``part_a``, ``part_b``, ``part_c``), each exporting

- ``MODELS: list[TinyModel]`` (:class:`tests.tiny_models.TinyModel`, ``name`` = the model_type);
- ``NOT_BUILDABLE: dict[str, str]``: model_type → why it cannot be built tiny or run here;
- ``KNOWN_GAPS: dict[str, dict[str, str]]`` (optional): check → model_type → cause, for the
  product gaps that make a check fail (``xfail(strict=True)`` in ``tests/test_vlm_classes.py``).
  Checks: ``"sites"``, ``"exact"``, ``"span"`` (see :mod:`tests.vlm_classes.checks`);
- ``SLOW: dict[str, str]`` (optional): model_type → why its generations cost too much for the CI
  sample of ``tests/test_vlm_classes.py`` (they still run with ``ROTATEK_VLM_CLASSES=all``).

A part file that does not exist yet counts as empty.
"""

from __future__ import annotations

import importlib

from tests.tiny_models import TinyModel

PARTS = ("part_a", "part_b", "part_c")
CHECKS = ("sites", "exact", "span")


def _load(part: str):
    try:
        return importlib.import_module(f"{__name__}.{part}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{part}":
            raise
        return None


_modules = [m for m in (_load(p) for p in PARTS) if m is not None]

ALL: list[TinyModel] = [entry for m in _modules for entry in getattr(m, "MODELS", [])]
NOT_BUILDABLE: dict[str, str] = {k: v for m in _modules for k, v in getattr(m, "NOT_BUILDABLE", {}).items()}
KNOWN_GAPS: dict[str, dict[str, str]] = {check: {} for check in CHECKS}
for _m in _modules:
    for _check, _gaps in getattr(_m, "KNOWN_GAPS", {}).items():
        if _check not in KNOWN_GAPS:
            raise ValueError(f"{_m.__name__}.KNOWN_GAPS: unknown check {_check!r} (expected one of {CHECKS})")
        KNOWN_GAPS[_check].update(_gaps)

SLOW: dict[str, str] = {k: v for m in _modules for k, v in getattr(m, "SLOW", {}).items()}

BY_NAME: dict[str, TinyModel] = {entry.name: entry for entry in ALL}
