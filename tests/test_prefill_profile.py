"""``benchmarks/prefill_profile.py``'s reading of the CUDA allocator's trace: what is alive at the peak."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from prefill_profile import live_at_peak  # noqa: E402


def _alloc(addr, size, line):
    return dict(action="alloc", addr=addr, size=size, frames=[dict(filename="/x/gen.py", line=line, name="call")])


def test_live_at_peak_groups_the_blocks_alive_at_the_largest_total():
    # 100 + 50 (peak 150 at event 2), free 100, then 30 + 30 (total 110, below the peak)
    events = [_alloc(1, 100, 10), _alloc(2, 50, 20), dict(action="free_requested", addr=1, size=100),
              dict(action="free_completed", addr=1, size=100), _alloc(3, 30, 10), _alloc(4, 30, 10),
              dict(action="free_requested", addr=99, size=7)]  # a block allocated before the trace
    peak, groups = live_at_peak({"device_traces": [events]})
    assert peak == 150e-9
    assert [(round(gb * 1e9), blocks) for gb, blocks, _ in groups] == [(100, 1), (50, 1)]
    assert groups[0][2].startswith("gen.py:10 call")
