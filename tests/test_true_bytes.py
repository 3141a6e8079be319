"""True bytes: every stored tensor is counted, and a layer never stores more than the exact cache.

Tiny Llama (d = 16, 2 layers, 2 KV heads) on CPU, ``inner="eager"``.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import rotatek_compile
from rotatek_compile import RotateKBackend, RotateKConfig
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.state import CompressedLayer, attached
from tests.test_generate import HEAD_DIM, LAYERS, generate, max_logit_error, tiny_llama

WINDOW = 32  # the default query_window: the prompt's exact tail


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def prompt(length: int, batch: int = 1) -> dict:
    input_ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(2))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def tensors_of(layer: CompressedLayer) -> list[torch.Tensor]:
    """Every tensor a compressed layer holds, found field by field (so a new field is counted too)."""
    found = []
    for field in dataclasses.fields(layer):
        value = getattr(layer, field.name)
        found += [value] if isinstance(value, torch.Tensor) else [
            v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, tuple) else []
    return found


def test_cache_bytes_counts_every_stored_tensor():
    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    cache = output_cache(generate(model, prompt(80, batch=2), steps=3))
    measured = 0
    for layer in cache.layers:
        state = attached(layer.keys)
        assert state is not None
        measured += sum(t.untyped_storage().nbytes() for t in tensors_of(state))
        measured += layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()  # stand-ins
    reported = rotatek_compile.cache_bytes(cache)
    assert reported.total == measured
    assert reported.masks > 0 and reported.span_basis > 0


def test_rotatek_basis_is_stored_in_the_cache_dtype():
    model = tiny_llama().to(torch.bfloat16)
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    cache = output_cache(generate(model, prompt(80), steps=2))
    for layer in cache.layers:
        state = attached(layer.keys)
        assert {t.dtype for t in state.span_key_parts} == {torch.bfloat16}
        _, rotation, residual = state.span_key_parts
        assert state.basis_bytes == rotation.numel() * 2 + residual.numel() * 2


def test_tiny_span_layer_stays_exact(caplog):
    # span = 36 - 32 = 4 tokens, 1 of them the sink: 3 tokens save 3·(16 - 4) Key elements per
    # head, the basis costs 16·4 + 16: compressing would store more, so the cache stays exact
    model, inputs = tiny_llama(), prompt(WINDOW + 4)
    exact = generate(model, inputs, steps=4)
    backend = RotateKBackend(RotateKConfig(key_channels=4), inner="eager")
    model.compile(backend=backend)
    with caplog.at_level(logging.INFO, logger="rotatek_compile"):
        compressed = generate(model, inputs, steps=4)
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-5
    assert all(attached(layer.keys) is None for layer in output_cache(compressed).layers)
    prefill = next(report for report in backend.reports if report.phase == "prefill")
    assert sorted(prefill.kept_exact) == sorted(prefill.rewritten) and len(prefill.rewritten) == LAYERS
    assert all("would not be smaller" in reason for reason in prefill.kept_exact.values())
    assert "kept exact: its compressed form" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "rotatek_compile"]
    bytes_ = rotatek_compile.cache_bytes(output_cache(compressed))
    assert bytes_.total == rotatek_compile.cache_bytes(output_cache(exact)).total

    torch._dynamo.reset()
    explanation = rotatek_compile.explain(tiny_llama(), inputs, key_channels=4, inner="eager")
    assert len(explanation.kept_exact) == LAYERS and explanation.rank == {}
    assert "rewritten sites kept exact at prefill: 2" in str(explanation)


def test_a_long_span_is_compressed_and_smaller():
    model, inputs = tiny_llama(), prompt(WINDOW + 40)
    explanation = rotatek_compile.explain(model, inputs, key_channels=4, inner="eager")
    assert explanation.kept_exact == [] and len(explanation.rank) == LAYERS
    assert explanation.compressed.total < explanation.baseline.total


def test_full_rank_asks_to_save_nothing_and_is_never_kept_exact():
    # r = d with every token kept is the compressed path's exactness check, even on a tiny span
    model, inputs = tiny_llama(), prompt(WINDOW + 4)
    exact = generate(model, inputs, steps=4)
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "inner": "eager"})
    compressed = generate(model, inputs, steps=4)
    assert all(attached(layer.keys) is not None for layer in output_cache(compressed).layers)
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4
