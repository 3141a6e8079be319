"""End-to-end behaviour of the backend under ``generate()`` and manual decoding (tiny Llama, CPU).

The state requirements of ``docs/design.md``: real memory drop, per-request state, HF bookkeeping,
clear errors on unsupported paths, no recompilation per decode step.
"""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import rotatek_compile
from rotatek_compile import RotateKBackend, RotateKCacheError, RotateKConfig
from rotatek_compile.hf_compat import cache_kwargs, output_cache
from rotatek_compile.state import CompressedLayer, attached

HEAD_DIM = 16
LAYERS = 2
# Prompts of tests that need a compressed cache at r < d: a 32-token span (the default window of 32
# stays exact) saves more than the per-head basis costs. A span of a few tokens would not, and its
# layer would keep HF's exact cache (rotatek_compile.state.KeptExact).
PROMPT = 64


def tiny_llama(attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


def padded_prompt(batch: int = 2, length: int = 48) -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1:, :7] = 0  # left padding on the other rows
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def generate(model, inputs, steps: int = 16, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def max_logit_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_full_rank_matches_uncompiled_model(attn_implementation):
    model, inputs = tiny_llama(attn_implementation), padded_prompt()
    exact = generate(model, inputs)
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "inner": "eager"})
    compressed = generate(model, inputs)
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4
    assert all(attached(layer.keys) is not None for layer in output_cache(compressed).layers)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rotatek", "think"])  # state layouts of 3 and 2 Key parts
def test_full_rank_matches_under_inductor(method):
    model, inputs = tiny_llama(), padded_prompt()
    exact = generate(model, inputs, steps=4)
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "method": method})
    compressed = generate(model, inputs, steps=4)
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4


def test_pruned_cache_holds_fewer_key_bytes():
    model, inputs = tiny_llama(), padded_prompt()
    exact = generate(model, inputs, steps=4)
    rank = HEAD_DIM // 4
    model.compile(backend="rotatek", options={"key_channels": rank, "inner": "eager"})
    compressed = generate(model, inputs, steps=4)
    assert all(torch.isfinite(x).all() for x in compressed.logits)
    before = rotatek_compile.cache_bytes(output_cache(exact))
    after = rotatek_compile.cache_bytes(output_cache(compressed))
    assert after.compressed_layers == LAYERS
    for layer in output_cache(compressed).layers:
        state = attached(layer.keys)
        batch, heads, span, _ = state.span_key_parts[0].shape
        assert state.span_key_bytes == batch * heads * span * rank * 4  # r of d channels, fp32
        assert layer.keys.untyped_storage().nbytes() == 4  # HF's tensor is a one-element stand-in
    # span = prompt minus the last 32 tokens: 16 of 48 (row 0) and 9 of 41 (row 1) stay full
    assert after.keys < before.keys
    assert after.values <= before.values + 8 * LAYERS


def test_no_recompilation_per_decode_step():
    model, inputs = tiny_llama(), padded_prompt()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    generate(model, inputs, steps=3)
    graphs_after_three = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate(model, inputs, steps=16)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_three == 2  # prefill, decode


def prefill(model, input_ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True)
    return out.logits[:, -1:].argmax(-1), output_cache(out)


def decode(model, token, cache):
    with torch.no_grad():
        out = model(input_ids=token, **cache_kwargs(cache), use_cache=True)
    return out.logits[:, -1:].argmax(-1), out.logits[:, -1]


def test_interleaved_generations_do_not_share_state():
    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    prompts = [torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]

    def alone(prompt):
        token, cache = prefill(model, prompt)
        logits = []
        for _ in range(6):
            token, step_logits = decode(model, token, cache)
            logits.append(step_logits)
        return torch.cat(logits)

    expected = [alone(p) for p in prompts]
    (token_a, cache_a), (token_b, cache_b) = prefill(model, prompts[0]), prefill(model, prompts[1])
    logits_a, logits_b = [], []
    for _ in range(6):
        token_a, step_a = decode(model, token_a, cache_a)
        token_b, step_b = decode(model, token_b, cache_b)
        logits_a.append(step_a)
        logits_b.append(step_b)
    assert torch.equal(torch.cat(logits_a), expected[0])
    assert torch.equal(torch.cat(logits_b), expected[1])


def live_compressed_layers() -> int:
    gc.collect()
    return sum(isinstance(obj, CompressedLayer) for obj in gc.get_objects())


def test_state_dies_with_the_cache():
    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    prompt = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    baseline = live_compressed_layers()
    for request in range(100):
        token, cache = prefill(model, prompt)
        decode(model, token, cache)
        if request % 25 == 0:
            assert live_compressed_layers() == baseline + LAYERS  # this request's layers only
    del cache
    assert live_compressed_layers() == baseline


def test_think_keeps_channels_and_their_indices():
    # ThinK stores what it needs: the r kept channels per token and r int16 indices per head
    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "method": "think", "inner": "eager"})
    token, cache = prefill(model, torch.randint(0, 128, (2, PROMPT), generator=torch.Generator().manual_seed(9)))
    decode(model, token, cache)
    for layer in cache.layers:
        state = attached(layer.keys)
        kept, channels = state.span_key_parts
        batch, heads, span, rank = kept.shape
        assert rank == 4 and channels.shape == (batch, heads, 4) and channels.dtype == torch.int16
        assert state.basis_bytes == batch * heads * 4 * 2
        assert state.span_key_bytes == batch * heads * span * 4 * kept.element_size()


def test_beam_search_is_refused():
    model, inputs = tiny_llama(), padded_prompt(batch=1)
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    with pytest.raises(Exception, match="beam search"):
        generate(model, inputs, steps=4, num_beams=2)


def test_cropped_cache_is_refused():
    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    token, cache = prefill(model, torch.randint(0, 128, (1, PROMPT)))
    with pytest.raises(RotateKCacheError, match="cropping"):
        cache.crop(-10)  # drop the last 10 tokens: refused at the crop itself
        decode(model, token, cache)


def chunk_then_step(model, prompt, chunk):
    """Prefill ``prompt``, append ``chunk`` ``[B, T]`` in one call, then one decode step."""
    _, cache = prefill(model, prompt)
    with torch.no_grad():
        out = model(input_ids=chunk, **cache_kwargs(cache), use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _, last = decode(model, token, cache)
    return out.logits, last, cache


def test_chunk_on_compressed_cache_equals_token_by_token():
    # T tokens appended in one call (teacher forcing, a second prompt turn) attend exactly as T
    # one-token steps would: the span stays compressed, the chunk is causal among itself.
    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    generator = torch.Generator().manual_seed(5)
    prompt, chunk = torch.randint(0, 128, (2, PROMPT), generator=generator), torch.randint(0, 128, (2, 6), generator=generator)
    chunk_logits, after_chunk, cache = chunk_then_step(model, prompt, chunk)
    assert all(attached(layer.keys) is not None for layer in cache.layers)
    assert cache.get_seq_length() == PROMPT + 6 + 1

    _, stepped = prefill(model, prompt)
    step_logits = [decode(model, chunk[:, t: t + 1], stepped)[1] for t in range(chunk.shape[1])]
    torch.testing.assert_close(chunk_logits, torch.stack(step_logits, dim=1), atol=1e-5, rtol=1e-5)
    _, step_after = decode(model, chunk_logits[:, -1:].argmax(-1), stepped)
    torch.testing.assert_close(after_chunk, step_after, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["rotatek", "think", "spark"])
def test_full_rank_chunk_matches_uncompiled_model(method):
    prompt = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    chunk = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    model = tiny_llama()
    exact_logits, exact_last, _ = chunk_then_step(model, prompt, chunk)
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "method": method, "inner": "eager"})
    logits, last, _ = chunk_then_step(model, prompt, chunk)
    assert (logits - exact_logits).abs().max().item() < 1e-4
    assert (last - exact_last).abs().max().item() < 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])  # boolean / additive masks
def test_second_turn_of_generate_on_a_compressed_cache(attn_implementation):
    # multi-turn chat: generate, append the next user turn, generate again on the same cache; the
    # second row's turn is shorter, padded inside the sequence (its mask zeros must be honoured)
    model, inputs = tiny_llama(attn_implementation), padded_prompt()
    turn = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(8))
    turn_mask = torch.ones_like(turn)
    turn_mask[1, :4] = 0

    def two_turns():
        first = generate(model, inputs, steps=5)
        ids = torch.cat([first.sequences, turn], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1]:]),
                          turn_mask], dim=1)
        return generate(model, {"input_ids": ids, "attention_mask": mask}, steps=5,
                        **cache_kwargs(output_cache(first)))

    exact = two_turns()
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "inner": "eager"})
    compressed = two_turns()
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4
    assert all(attached(layer.keys) is not None for layer in output_cache(compressed).layers)


def test_reports_and_explain():
    model, inputs = tiny_llama(), padded_prompt()
    backend = RotateKBackend(RotateKConfig(key_channels=4), inner="eager")
    model.compile(backend=backend)
    generate(model, inputs, steps=3)
    phases = [report.phase for report in backend.reports]
    assert phases == ["prefill", "decode"]  # one decode graph: the cache length is symbolic
    assert all(len(report.rewritten) == LAYERS for report in backend.reports)

    torch._dynamo.reset()
    explanation = rotatek_compile.explain(tiny_llama(), inputs, key_channels=4, inner="eager")
    assert explanation.rewritten == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert explanation.rank == {name: 4 for name in explanation.rewritten}
    assert explanation.compressed.keys < explanation.baseline.keys
    assert "Key cache bytes" in str(explanation)


@pytest.mark.parametrize("method, basis_per_head", [
    ("rotatek", (HEAD_DIM * 4 + HEAD_DIM) * 4),  # R (d·r) and δμ (d) in the cache dtype (fp32 here), r = 4
    ("think", 4 * 2),  # r int16 channel indices
    ("spark", 0),  # every part is per token
])
def test_explain_reports_the_span_budget(method, basis_per_head):
    # per method, the span's per-token Key parts and its per-head basis (R and δμ / indices / none)
    inputs = padded_prompt()
    explanation = rotatek_compile.explain(tiny_llama(), inputs, key_channels=4, method=method, inner="eager")
    compressed = explanation.compressed
    heads = 2 * inputs["input_ids"].shape[0]  # 2 KV heads per row
    assert compressed.compressed_layers == LAYERS
    assert compressed.span_basis == LAYERS * heads * basis_per_head
    assert compressed.span_keys > 0
    assert f"({method}, token_keep 1)" in str(explanation)
    assert f"{compressed.span_basis} bytes of per-head basis/indices" in str(explanation)
