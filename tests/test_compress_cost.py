"""``benchmarks/compress_cost.py`` on the CPU at a small size: every timing is written, the profile
names each step of ``compress_layers`` with its host time, and the product's functions are left
as they were after profiling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compress_cost  # noqa: E402


def test_compress_cost_writes_every_timing_and_each_steps_profile(tmp_path):
    originals = [getattr(module, name) for module, name in compress_cost.PHASES]
    assert compress_cost.main(["--lengths", "64", "--reps", "1", "--layers", "2", "--profile",
                               "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "compress_cost.json").read_text())["rows"][0]
    assert row["tokens"] == 64 and row["layers"] == 2
    assert row["compress_layers_ms"] > 0 and row["compress_layers_reference_ms"] > 0 and row["attention_math_d_ms"] > 0
    assert 0.99 <= row["subspace_energy_vs_exact"] <= 1.0 + 1e-6
    profile = (tmp_path / "compress_profile.txt").read_text()
    lines = profile.splitlines()[2:]
    steps = {line.split()[0]: line.split()[1:] for line in lines[:len(compress_cost.PHASES)] if len(line.split()) == 4}
    assert set(steps) == {name for _, name in compress_cost.PHASES}  # each step ran
    assert int(steps["basis_attention_error"][0]) == 2 and float(steps["basis_attention_error"][1]) > 0
    assert int(steps["solve_basis"][0]) == 1 and int(steps["sinks_by_share"][0]) == 1  # once for both layers
    assert [getattr(module, name) for module, name in compress_cost.PHASES] == originals
