"""Every VLM class of transformers: tiny random-init model under ``generate()`` with the rotatek backend.

(1) coverage: every model_type of ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` and
    ``MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES`` of the installed transformers is a tiny model of
    :mod:`tests.vlm_classes` or of ``tests/tiny_models.py``, or is listed as not buildable with a
    reason;
(2) per class, the checks of :mod:`tests.vlm_classes.checks` (``sites``, ``exact``, ``span``) on one
    uncompiled and two compiled generations, shared by the checks (:func:`_run`). Known product
    gaps are ``xfail(strict=True)`` with their cause (``KNOWN_GAPS`` of the part files).

Cost: two compiled generations are two Dynamo traces of the whole model (~8 s of CPU per class on
average). Every class but the parts' ``SLOW`` ones runs by default (``ROTATEK_VLM_CLASSES=all``
adds those); CI spreads the suite over the machine's cores (``pytest -n auto --dist loadgroup``:
each class's checks stay on one worker, which shares its runs).
``ROTATEK_VLM_CLASSES=quick`` runs only the classes of :data:`QUICK` (every ``QUICK_STRIDE``-th class
by name, so that every part is sampled, minus the parts' ``SLOW`` classes), for a quick local run.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import transformers

from tests.tiny_models import TINY_MODELS
from tests.vlm_classes import ALL, BY_NAME, KNOWN_GAPS, NOT_BUILDABLE, SLOW
from tests.vlm_classes import checks
from tests.vlm_classes.common import not_in_transformers

QUICK_STRIDE = 5  # ~110 classes → ~22 sampled, ~6 min of CPU
QUICK = frozenset(sorted(BY_NAME)[::QUICK_STRIDE]) - set(SLOW)
SELECTION = os.environ.get("ROTATEK_VLM_CLASSES", "default")  # "quick", "default" (all but SLOW) or "all"
if SELECTION not in ("quick", "default", "all"):
    raise ValueError(f"ROTATEK_VLM_CLASSES={SELECTION!r} is invalid: expected 'quick', 'default' or 'all'")


def _skip_reason(name: str) -> Optional[str]:
    if SELECTION == "all":
        return None
    if name in SLOW:
        return f"slow ({SLOW[name]}): ROTATEK_VLM_CLASSES=all runs it"
    if SELECTION == "quick" and name not in QUICK:
        return "not in the quick sample (ROTATEK_VLM_CLASSES=quick)"
    return None


def _mapped_model_types() -> set[str]:
    from transformers.models.auto import modeling_auto

    names = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES")
    return {model_type for name in names for model_type in getattr(modeling_auto, name, {})}


def test_every_class_is_covered():
    covered = set(BY_NAME) | set(NOT_BUILDABLE) | {m.name for m in TINY_MODELS}
    missing = sorted(_mapped_model_types() - covered)
    assert not missing, f"transformers {transformers.__version__}: model types with no tiny model: {missing}"


def test_registry_is_consistent():
    names = [entry.name for entry in ALL]
    assert len(names) == len(set(names)), "a model type is registered twice"
    assert not set(names) & set(NOT_BUILDABLE), "a model type is both built and listed as not buildable"
    assert not set(names) & {m.name for m in TINY_MODELS}, "a model type duplicates tests/tiny_models.py"
    assert all(reason.strip() for reason in NOT_BUILDABLE.values())
    assert set(SLOW) <= set(names) and all(reason.strip() for reason in SLOW.values())
    for check, gaps in KNOWN_GAPS.items():
        assert set(gaps) <= set(names), f"KNOWN_GAPS[{check!r}] names unknown model types: {set(gaps) - set(names)}"
        assert all(cause.strip() for cause in gaps.values())


# ---------------------------------------------------------------------------------------------
# One uncompiled and two compiled generations per class, shared by its checks


_RUNS: dict[tuple, object] = {}


def _run(name: str, key_channels: Optional[int]) -> checks.Run:
    key = (name, key_channels)
    if key not in _RUNS:
        try:
            _RUNS[key] = checks.generate(BY_NAME[name], key_channels)
        except Exception as error:  # stored: every check that needs this run reports it
            _RUNS[key] = error
    result = _RUNS[key]
    if isinstance(result, Exception):
        if not_in_transformers(result):
            pytest.skip(f"not in transformers {transformers.__version__}: {result}")
        raise result
    return result


def _classes(check: str):
    gaps = KNOWN_GAPS.get(check, {})
    params = []
    for name in sorted(BY_NAME):
        marks = []
        if name in gaps:
            marks.append(pytest.mark.xfail(reason=gaps[name], strict=True))
        skip = _skip_reason(name)
        if skip:
            marks.append(pytest.mark.skip(reason=skip))
        marks.append(pytest.mark.xdist_group(name))  # one worker runs a class's checks: its runs are shared
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.mark.parametrize("name", _classes("sites"))
def test_sites(name):
    entry = BY_NAME[name]
    checks.check_sites(entry, _run(name, entry.head_dim))


@pytest.mark.parametrize("name", _classes("exact"))
def test_exact(name):
    entry = BY_NAME[name]
    checks.check_exact(_run(name, None), _run(name, entry.head_dim))


@pytest.mark.parametrize("name", _classes("span"))
def test_span(name):
    entry = BY_NAME[name]
    checks.check_span(entry, _run(name, None), _run(name, max(1, entry.head_dim // 4)))
