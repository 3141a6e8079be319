"""README.md's code runs as written (on a tiny Llama standing in for ``model``/``inputs``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.test_generate import padded_prompt, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_use_snippet_runs_as_written(capsys):
    first = _python_blocks("Use")[0]
    torch._dynamo.reset()
    model, inputs = tiny_llama(), padded_prompt()
    model.generation_config.pad_token_id = 0
    namespace = {"model": model, "inputs": inputs}
    with torch.no_grad():
        exec(compile(first, str(README), "exec"), namespace)
    torch._dynamo.reset()
    printed = capsys.readouterr().out
    measured = namespace["rotatek_compile"].cache_bytes(namespace["out"])
    assert measured.compressed_layers == 2 and measured.keys > 0
    assert "CacheBytes(" in printed and "Key cache bytes" in printed
