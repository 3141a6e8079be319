"""Paths where Dynamo does not run the rewritten graphs: never a silent wrong answer.

A compressed cache holds :class:`~rotatek_compile.state.StandIn` tensors; any code that was not
compiled by the backend and reads one raises :class:`RotateKCacheError` (it would otherwise attend
on NaN). Compression that is off where it could be on says so in one WARNING.
"""

from __future__ import annotations

import logging

import pytest
import torch

from rotatek_compile import RotateKCacheError
from rotatek_compile.hf_compat import cache_kwargs, output_cache
from rotatek_compile.state import attached
from tests.test_generate import HEAD_DIM, generate, padded_prompt, tiny_llama


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _second_turn(model, first, inputs, steps=3):
    turn = torch.randint(3, 128, (first.sequences.shape[0], 4), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([first.sequences, turn], dim=1)
    mask = torch.cat([inputs["attention_mask"],
                      torch.ones(ids.shape[0], ids.shape[1] - inputs["attention_mask"].shape[1], dtype=torch.long)], 1)
    return generate(model, {"input_ids": ids, "attention_mask": mask}, steps=steps, **cache_kwargs(output_cache(first)))


def test_uncompiled_frame_on_a_compressed_cache_raises():
    # what Dynamo does past its recompile limit: the same frame, run uncompiled
    model, inputs = tiny_llama(), padded_prompt()
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "inner": "eager"})
    first = generate(model, inputs, steps=2)
    assert all(attached(layer.keys) is not None for layer in output_cache(first).layers)
    with torch.compiler.set_stance("force_eager"):
        with pytest.raises(RotateKCacheError, match="recompile limit"):
            _second_turn(model, first, inputs)


def test_recompile_limit_is_loud(caplog):
    # a limit of 1: the prefill compiles, the first decode step falls back to the uncompiled
    # frame, which meets the compressed cache → an error, and one WARNING of ours
    model, inputs = tiny_llama(), padded_prompt()
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "inner": "eager"})
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING):
        with pytest.raises(RotateKCacheError):
            generate(model, inputs, steps=3)
    ours = [r for r in caplog.records if r.name == "rotatek_compile" and r.levelno == logging.WARNING]
    assert len(ours) == 1 and "recompile limit" in ours[0].getMessage()


def test_mixed_traffic_is_exact_or_refused(caplog):
    # past a (low) recompile limit: each request, with its second turn, either answers exactly
    # as the uncompiled model (compressed, or run exact by the fallback) or is refused loudly
    lengths = [[45], [50, 41], [44, 58, 47], [52], [40, 55]]

    def serve(model):
        answers = []
        for i, rows in enumerate(lengths):
            width = max(rows)
            ids = torch.randint(3, 128, (len(rows), width), generator=torch.Generator().manual_seed(i))
            mask = torch.zeros_like(ids)
            for b, n in enumerate(rows):
                mask[b, width - n:] = 1
            inputs = {"input_ids": ids, "attention_mask": mask}
            try:
                first = generate(model, inputs, steps=3)
                second = _second_turn(model, first, inputs)
            except RotateKCacheError as error:
                answers.append(error)
                continue
            answers.append((first.sequences, second.sequences, torch.stack(second.logits)))
        return answers

    model = tiny_llama()
    exact = serve(model)
    model.compile(backend="rotatek", options={"key_channels": HEAD_DIM, "inner": "eager"})
    with torch._dynamo.config.patch(recompile_limit=4), caplog.at_level(logging.WARNING):
        compiled = serve(model)
    for expected, got in zip(exact, compiled):
        if isinstance(got, RotateKCacheError):
            assert "recompile limit" in str(got)
            continue
        (a1, a2, a_logits), (b1, b2, b_logits) = expected, got
        assert torch.isfinite(b_logits).all()
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert (a_logits - b_logits).abs().max() < 1e-4
    assert any("recompile limit" in r.getMessage() for r in caplog.records if r.name == "rotatek_compile")
    assert not isinstance(compiled[0], Exception)  # the first request is served compressed


def test_ordinary_traffic_stays_compiled_and_compressed(caplog):
    # batch sizes 1–8, different lengths, each with a second turn: every returned cache is
    # compressed (no request fell back to the uncompiled model), and nothing warned
    from rotatek_compile.backend import RECOMPILE_LIMIT

    model = tiny_llama()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    with caplog.at_level(logging.WARNING):
        for i, batch in enumerate([1, 2, 5, 1, 8, 3]):
            inputs = padded_prompt(batch, length=56 + 3 * i)  # spans long enough to be worth compressing
            first = generate(model, inputs, steps=2)
            second = _second_turn(model, first, inputs, steps=2)
            for out in (first, second):
                assert all(attached(layer.keys) is not None for layer in output_cache(out).layers), i
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "rotatek" in r.name]


def test_returned_attention_weights_warn(caplog):
    model, inputs = tiny_llama("eager"), padded_prompt()
    model.compile(backend="rotatek", options={"key_channels": 4, "inner": "eager"})
    with caplog.at_level(logging.WARNING):
        generate(model, inputs, steps=2, output_attentions=True)
    ours = [r.getMessage() for r in caplog.records if r.name == "rotatek_compile" and r.levelno == logging.WARNING]
    assert len(ours) == 1 and "layers.0.self_attn" in ours[0] and "reused" in ours[0]


def test_unrecognised_attention_on_a_kv_cache_is_reported_and_left_exact(caplog):
    """GPT-OSS's eager attention puts sink logits inside the softmax (``softmax(cat(logits,
    sinks))[..., :-1]``), a form the pass does not match. Its layers write a KV cache, so they are
    decoder layers left exact: reported with the reason and one WARNING (it used to say nothing),
    and the answers are the uncompiled model's."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from rotatek_compile import RotateKBackend, RotateKConfig
    from rotatek_compile.passes.find_attention import _UNKNOWN_READER

    config = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    backend = RotateKBackend(RotateKConfig(key_channels=4, span="prompt"), inner="eager")
    model.compile(backend=backend)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, expected)
    skipped = {layer for report in backend.reports for layer, reason in report.skipped if reason == _UNKNOWN_READER}
    assert skipped == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    ours = [r.getMessage() for r in caplog.records if r.name == "rotatek_compile" and r.levelno == logging.WARNING]
    assert len(ours) == 1 and _UNKNOWN_READER in ours[0], ours


def test_an_image_reached_only_by_cross_attention_is_loud():
    """A vision encoder-decoder (ViT encoder, GPT-2 decoder): the decoder's own prompt holds no
    image token, so no self-attention layer stores less, and the cross-attention cache that holds
    the image is never compressed. That used to pass without a word; now one WARNING names the
    layers, and the answers are the uncompiled model's."""
    from tests.vlm_classes import BY_NAME, checks

    entry = BY_NAME["vision-encoder-decoder"]
    exact = checks.generate(entry, None)
    compiled = checks.generate(entry, entry.head_dim)
    assert torch.equal(exact.sequences, compiled.sequences)
    (warning,) = compiled.warnings
    assert "cross-attention" in warning and "decoder.transformer.h.0.attn" in warning, warning
    assert "decoder.transformer.h.0.crossattention" in warning
