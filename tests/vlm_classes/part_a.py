"""Tiny models, part a of the VLM class registry (see :mod:`tests.vlm_classes`)."""

from __future__ import annotations

from tests.tiny_models import TinyModel

MODELS: list[TinyModel] = []
NOT_BUILDABLE: dict[str, str] = {}
KNOWN_GAPS: dict[str, dict[str, str]] = {}
