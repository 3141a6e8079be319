"""``benchmarks/gemv_grouping.py`` on CPU: both ways of running a layer's products give the same
outputs, from the same weight memory, and every row of the table is measured."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gemv_grouping  # noqa: E402
from tests.triton_interpreted import kernel_module  # noqa: E402


def test_grouped_products_equal_the_separate_ones_from_the_same_memory():
    layer = gemv_grouping.LayerWeights(gemv_grouping.TINY, torch.float32, "cpu", torch.Generator().manual_seed(0))
    for part, whole in ((layer.q, layer.qkv), (layer.v, layer.qkv), (layer.up, layer.gate_up)):
        assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()  # a view: no second copy
    x = torch.randn(3, gemv_grouping.TINY.hidden)
    separate, grouped = gemv_grouping.separate(layer, x), gemv_grouping.grouped(layer, x)
    assert set(separate) == set(grouped) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert separate["k"].shape == (3, gemv_grouping.TINY.kv_out)
    q_out, kv_out = gemv_grouping.TINY.q_out, gemv_grouping.TINY.kv_out  # k: rows q_out .. q_out + kv_out
    assert torch.allclose(separate["k"], torch.nn.functional.linear(x, layer.qkv)[:, q_out:q_out + kv_out], atol=1e-6)
    assert gemv_grouping.max_relative_error(separate, grouped) < 1e-5
    # bytes: one layer's weights, each counted once
    s = gemv_grouping.TINY
    assert layer.bytes() == 4 * (s.hidden * (s.q_out + 2 * s.kv_out) + s.q_out * s.hidden
                                 + 3 * s.intermediate * s.hidden)


def test_tiny_run_measures_every_product_and_both_layer_forms(tmp_path):
    result = gemv_grouping.main(["--tiny", "--out", str(tmp_path)])
    assert (tmp_path / "gemv_grouping.json").exists()
    for batch in (1, 8):
        rows = {row["what"]: row for row in result["rows"] if row["batch"] == batch}
        assert set(rows) == set(gemv_grouping.PRODUCTS) | {"layer, separate", "layer, grouped"}
        assert all(row["us_per_layer"] > 0 and row["floor_us"] > 0 for row in rows.values())
        assert rows["layer, grouped"]["weight_bytes"] == rows["layer, separate"]["weight_bytes"] \
            == sum(rows[name]["weight_bytes"] for name in ("qkv", "o", "gate_up", "down"))
        assert rows["layer, grouped"]["max_relative_error"] < 1e-5


def test_tiny_run_times_the_grouped_kernel_when_given():
    kernel = kernel_module("triton_gemv").grouped_linear_triton  # under the CPU interpreter without CUDA
    result = gemv_grouping.measure(gemv_grouping.TINY, [1, 2], 2, torch.float32, "cpu", 1, 1 << 16, {"kernel": kernel})
    rows = {row["what"]: row for row in result["rows"]}
    assert {"layer, grouped (kernel)", "qkv (kernel, one launch)", "gate_up (kernel, one launch)", "k (kernel)"} <= set(rows)
    assert rows["layer, grouped (kernel)"]["max_relative_error"] < 1e-5
    assert rows["qkv (kernel, one launch)"]["weight_bytes"] == rows["qkv"]["weight_bytes"]
