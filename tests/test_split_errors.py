"""``benchmarks/split_errors.py``: the candidates' errors are recorded on tuning prompts only, and
the token-only floor is fitted on the easy ones (``tiers.TOKEN_ONLY_FLOOR``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
split_errors = pytest.importorskip("split_errors")

from rotatek_compile import tiers  # noqa: E402


def _split(fraction: float, error: float) -> tiers.Split:
    return tiers.Split(rotated_fraction=fraction, exact=(1,), rotated=(1,), stored_bytes=1, error=error)


def test_only_tuning_prompts_of_the_recorded_budgets_are_kept():
    records, current = {"0.4": {}}, {}
    pick = split_errors.recorder(records, current, tiers.pick_split)
    scored = [_split(0.0, 0.02), _split(0.5, 0.01)]
    for prompt, budget in ((0, "0.4"), (1, "0.4"), (2, "None"), (2, "0.4")):
        current.update(prompt=prompt, budget=budget)
        assert pick(scored).rotated_fraction == 0.5  # the product's choice is unchanged
    assert records == {"0.4": {0: [{0.0: 0.02, 0.5: 0.01}], 2: [{0.0: 0.02, 0.5: 0.01}]}}


def test_the_floor_is_a_quantile_of_token_only_errors_on_easy_prompts():
    layers = {0: [{0.0: e} for e in (0.1, 0.2, 0.3, 0.4, 0.5)],  # easy
              2: [{0.0: 9.0}],  # hard: not counted
              4: [{0.0: e} for e in (0.6, 0.7, 0.8, 0.9)]}  # easy
    kl = [0.001, 0.5, 0.3, 0.5, 0.009]
    assert split_errors.fit_floor(layers, kl) == pytest.approx(0.7)  # index int(0.75 * 8) = 6 of 9 sorted
    with pytest.raises(ValueError, match="easy level"):
        split_errors.fit_floor({2: [{0.0: 9.0}]}, kl)


def test_the_recorded_run_gives_the_floor_the_cache_uses():
    """The committed run's records refit to ``tiers.TOKEN_ONLY_FLOOR`` (rounded as stored)."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    records = json.loads((results / "split_errors_2026-11-30" / "split_errors.json").read_text())["0.4"]
    kl = json.loads((results / "tiered_rule_2026-11-30" / "tiered_rule_smollm2.json").read_text())[
        "cells"]["token-only r/d=1 tk=0.4"]["per_prompt"]["kl"]
    layers = {int(prompt): [{float(f): e for f, e in layer.items()} for layer in per_layer]
              for prompt, per_layer in records.items()}
    assert split_errors.fit_floor(layers, kl) == pytest.approx(tiers.TOKEN_ONLY_FLOOR, abs=5e-5)
