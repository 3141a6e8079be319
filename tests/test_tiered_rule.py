"""``benchmarks/tiered_rule.py``'s summary: per rule and budget, ratios to token-only on each half."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
tiered_rule = pytest.importorskip("tiered_rule")
fidelity = tiered_rule.fidelity


def _record(kl: list[float]) -> dict:
    return {"per_prompt": {"kl": kl}, "bytes": [{"span_ratio": 0.5}] * len(kl), "feasible": [True] * len(kl)}


def test_summary_pairs_each_prompt_with_token_only_on_its_half():
    # prompts 0, 2 tune; 1, 3 are held out
    cells = {}
    for budget in fidelity.BUDGETS:
        cells[fidelity.Cell("token-only", "think", 1.0, budget).name] = _record([1.0, 2.0, 4.0, 1.0])
        for rule, kl in zip(tiered_rule.RULES, ([0.5, 4.0, 4.0, 0.5], [1.0, 1.0, 2.0, 2.0])):
            cells[fidelity.Cell(f"tiered {rule}", "rotatek", 0.5, 1.0, kv_budget=budget).name] = _record(kl)
    result = {"model": "m", "cells": cells, "prompts": [{"tuning": i % 2 == 0} for i in range(4)]}
    rows = tiered_rule.summary(result)
    assert len(rows) == len(fidelity.BUDGETS) * len(tiered_rule.RULES)
    most = rows[0]
    assert most["rule"] == "most rotated"
    assert most["tuning"]["mean_ratio"] == pytest.approx(4.5 / 5.0)  # (0.5 + 4) / (1 + 4)
    assert most["tuning"]["geo_mean"] == pytest.approx(math.sqrt(0.5 * 1.0))
    assert most["held-out"]["mean_ratio"] == pytest.approx(4.5 / 3.0)
    assert most["held-out"]["wins"] == 1 and most["held-out"]["prompts"] == 2
    assert "| m | 0.25 | most rotated | 0.900 / 0.707 / 1/2 |" in tiered_rule.table(rows)


def test_summary_covers_the_rules_that_were_run():
    """``--rules`` runs a subset (here one rule): the summary has a row per budget of that rule only."""
    cells = {}
    for budget in fidelity.BUDGETS:
        cells[fidelity.Cell("token-only", "think", 1.0, budget).name] = _record([1.0, 2.0])
        tied = fidelity.Cell("tiered token-only when tied", "rotatek", 0.5, 1.0, kv_budget=budget)
        cells[tied.name] = _record([1.0, 1.0])
    result = {"model": "m", "cells": cells, "prompts": [{"tuning": True}, {"tuning": False}]}
    assert tiered_rule.rules_of(result) == ["token-only when tied"]
    rows = tiered_rule.summary(result)
    assert [row["rule"] for row in rows] == ["token-only when tied"] * len(fidelity.BUDGETS)
    assert rows[0]["held-out"]["mean_ratio"] == pytest.approx(0.5)
