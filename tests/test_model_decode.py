"""``benchmarks/model_decode.py``'s max-batch search: the largest batch that fits, found by trying."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_decode import largest_fitting  # noqa: E402


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 7, 8, 9, 23, 64, 100])
def test_largest_fitting_finds_the_largest_batch_that_fits(capacity):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert largest_fitting(fits, limit=64) == min(capacity, 64)
    assert len(tried) <= 2 * 7 + 1  # doubling to 64, then bisecting: logarithmic in the limit
    assert all(1 <= b <= 64 for b in tried)
