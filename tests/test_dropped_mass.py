"""``benchmarks/dropped_mass.py``: the window attention token-only drops, in-sample and held-out,
recorded on tuning prompts only, without changing the split the product takes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
dropped_mass = pytest.importorskip("dropped_mass")

from rotatek_compile import tiers  # noqa: E402

DIM, TOKENS = 8, 6


def _span(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row, one KV head: token 2's Key is the window's queries' direction, scaled up, so the
    window attends to it almost alone."""
    keys = torch.randn(1, 1, TOKENS, DIM, generator=gen) * 0.1
    queries = torch.randn(1, 1, 4, DIM, generator=gen) * 0.1
    queries[..., 0] = 1.0
    keys[0, 0, 2, 0] = 20.0
    return queries, keys, torch.ones(1, TOKENS, dtype=torch.bool)


def test_the_dropped_share_is_what_the_kept_tokens_miss():
    queries, keys, mask = _span(torch.Generator().manual_seed(0))
    share = dropped_mass.dropped_share(queries, queries, keys, mask, 1.0, (1,))  # keeps token 2
    assert 0 <= share < 1e-6
    assert dropped_mass.dropped_share(queries, queries, keys, mask, 1.0, (0,)) == pytest.approx(1.0)
    assert dropped_mass.dropped_share(queries, queries, keys, mask, 1.0, (TOKENS,)) == pytest.approx(0.0)


def test_only_tuning_prompts_of_the_recorded_budgets_are_kept():
    queries, keys, mask = _span(torch.Generator().manual_seed(1))
    values = torch.randn(1, 1, TOKENS, DIM)
    layout = tiers.Layout(heads=1, head_dim=DIM, value_dim=DIM, rank=2, element=4, outside=(4,), min_segment=2)
    allowed = layout.stored_bytes([3], [0])
    records, current = {"0.4": {}}, {}
    choose = dropped_mass.recorder(records, current, tiers.choose_split)
    chosen = []
    for prompt, budget in ((0, "0.4"), (1, "0.4"), (2, "None")):
        current.update(prompt=prompt, budget=budget)
        chosen.append(choose(queries, keys, values, mask, 1.0, layout, allowed, "auto")[0])
    alone = tiers.choose_split(queries, keys, values, mask, 1.0, layout, allowed, "auto")[0]
    assert all(split == alone for split in chosen)  # the product's choice is unchanged
    assert list(records["0.4"]) == [0] and len(records["0.4"][0]) == 1
    layer = records["0.4"][0][0]
    assert set(layer) == {"in_sample", "held_out", "error", "key_residual"}
    assert 0 <= layer["in_sample"] <= 1 and 0 <= layer["held_out"] <= 1


def test_the_key_residual_is_the_energy_outside_the_top_subspace():
    """Keys spread over two channels with variances 9 and 1: rank 1 misses a tenth, rank 2 nothing;
    masked tokens do not count."""
    keys = torch.zeros(1, 1, 8, DIM)
    keys[0, 0, :4, 0] = torch.tensor([3.0, -3.0, 3.0, -3.0])
    keys[0, 0, :4, 1] = torch.tensor([1.0, 1.0, -1.0, -1.0])
    keys[0, 0, 4:] = 50.0  # padding
    mask = torch.tensor([[True] * 4 + [False] * 4])
    assert dropped_mass.key_residual(keys, mask, 1) == pytest.approx(0.1, abs=1e-6)
    assert dropped_mass.key_residual(keys, mask, 2) == pytest.approx(0.0, abs=1e-6)
