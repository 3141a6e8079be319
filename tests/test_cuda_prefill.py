"""``rotatek.prefill_attention`` on a GPU: both branches equal masked SDPA with grouped KV heads, in
bf16, and the output has the layout its fake promises (what Inductor plans with)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rotatek_compile.ops  # noqa: F401  (registers torch.ops.rotatek.*)
from rotatek_compile.hf_compat import cache_kwargs, output_cache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_attention_with_grouped_heads_matches_masked_sdpa(padded):
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 8, 2, 512, 128
    options = dict(device="cuda", dtype=torch.bfloat16)
    query = torch.randn(batch, heads, length, dim, **options)
    keys, values = torch.randn(batch, kv_heads, length, dim, **options), torch.randn(batch, kv_heads, length, dim, **options)
    causal_mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    mask = causal_mask.expand(batch, 1, length, length).clone()
    if padded:
        mask[1, :, :, :17] = False  # row 1 left-padded
        mask[1, :, :17, :17] = torch.eye(17, dtype=torch.bool, device="cuda")
    flag = (mask == causal_mask).all()
    repeated = [x.repeat_interleave(heads // kv_heads, dim=1) for x in (keys, values)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.1)
    out = torch.ops.rotatek.prefill_attention(query, keys, values, mask, flag, 0.1, True)
    assert out.shape == expected.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def test_causal_prefill_into_a_longer_buffer_runs_a_fused_kernel():
    """A StaticCache's buffer is longer than the prompt (``S > L``): the mask is top-left causal over
    ``[L, S]``. The flash kernel takes ``is_causal`` only with ``L = S`` and the memory-efficient one
    has no grouped heads, so unsliced SDPA fell back to the math kernel, which materialises
    ``[B, Hq, L, S]`` fp32 scores (106 GB at 16k tokens on the 8B shape)."""
    torch.manual_seed(0)
    heads, kv_heads, length, capacity, dim = 32, 8, 2048, 2048 + 68, 128
    options = dict(device="cuda", dtype=torch.bfloat16)
    query = torch.randn(1, heads, length, dim, **options)
    keys = torch.randn(1, kv_heads, capacity, dim, **options)
    values = torch.randn(1, kv_heads, capacity, dim, **options)
    mask = torch.ones(length, capacity, dtype=torch.bool, device="cuda").tril()[None, None]  # [1, 1, L, S]
    flag = torch.tensor(True, device="cuda")
    repeated = [x.repeat_interleave(heads // kv_heads, dim=1) for x in (keys, values)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = torch.ops.rotatek.prefill_attention(query, keys, values, mask, flag, 0.1, True)
    torch.cuda.synchronize()
    scores = heads * length * capacity * 4  # what the math kernel would hold
    assert torch.cuda.max_memory_allocated() - before < scores / 8
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("padded", [False, True])
def test_lazy_mask_prefill_builds_the_mask_only_when_not_causal(padded):
    from tests.test_passes import check_lazy_mask_op

    check_lazy_mask_op(padded, device="cuda", dtype=torch.bfloat16, atol=2e-2)


@pytest.mark.parametrize("length", [3000, 2048, 1024])
def test_half_precision_compression_statistics_equal_fp64(length):
    """The compression's long products on a GPU take bf16 Keys as they are (tensor cores, fp32
    accumulation): the covariance (centred about the bf16-rounded mean, then corrected) and the
    window's attention scores equal fp64 ones of the same bf16 values, also with a large mean."""
    from rotatek_compile.kernels import reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, kv_heads, dim = 2, 2, 64
    keys = torch.randn(batch, kv_heads, length, dim, device="cuda", generator=gen)
    keys[..., :4] += 40.0  # channels whose mean is far larger than their spread
    keys = keys.bfloat16()
    mask = torch.rand(batch, length, device="cuda", generator=gen) > 0.2
    cov, mean = reference.span_covariance(keys, mask)
    exact = keys.double()
    weight = mask[:, None, :, None].double()
    exact_mean = (exact * weight).sum(2) / weight.sum(2)
    centred = (exact - exact_mean[:, :, None]) * weight
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-5)
    expected_cov = centred.transpose(-1, -2) @ centred
    # each centred Key rounded to bf16 once (relative 2⁻⁹, errors of random sign over the tokens)
    assert (cov.double() - expected_cov).norm() / expected_cov.norm() < 1e-3

    queries = torch.randn(batch, 2 * kv_heads, 8, dim, device="cuda", generator=gen).bfloat16()
    scores = reference.token_scores(queries, keys, 0.125, mask)
    logits = queries.double().reshape(batch, kv_heads, -1, dim) @ exact.transpose(-1, -2) * 0.125
    expected = logits.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).sum(2)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def _prefills_on_cuda():
    """The layers of ``tests/test_compress_layers.py`` (planted sinks, a padded row) in bf16 on the GPU."""
    from tests.test_compress_layers import prefills

    return [dataclasses.replace(p, keys=p.keys.cuda().bfloat16(), values=p.values.cuda().bfloat16(),
                                queries=p.queries.cuda().bfloat16(), span=p.span.cuda(), valid=p.valid.cuda())
            for p in prefills(5)]


def _assert_same_caches(mine: list, theirs: list) -> None:
    """The same segments and tokens kept, and span Keys that agree up to the order of sums."""
    for a, b in zip(mine, theirs, strict=True):
        assert a.split == b.split
        for name in ("span_values", "span_mask", "keys", "values", "mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        a_keys, b_keys = a.span_key_parts[0].float(), b.span_key_parts[0].float()
        # a basis vector's sign is free (so are rotations within near-equal eigenvalues): the span
        # Keys' norms per token are not
        assert ((a_keys.norm(dim=-1) - b_keys.norm(dim=-1)).norm() / b_keys.norm()) < 2e-2


@pytest.mark.parametrize("query_aware", [True, "auto"])
def test_layers_stacked_as_rows_equal_layers_alone_on_cuda(query_aware, monkeypatch):
    """On a GPU consecutive layers alike are stacked as batch rows (``state.STACK_BYTES``) for the
    basis choice (and, with ``kernel="reference"``, the covariances): in bf16 each layer's cache is
    the one it gets alone, up to the order of sums (the segments and the tokens kept are the same)."""
    from rotatek_compile import RotateKConfig, state
    from tests.test_sinks import WINDOW

    for kernel in ("auto", "reference"):
        config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4, query_aware=query_aware,
                               kernel=kernel)
        stacked = list(state.compress_layers(_prefills_on_cuda(), config))
        with monkeypatch.context() as patch:
            patch.setattr(state, "STACK_BYTES", {})
            alone = list(state.compress_layers(_prefills_on_cuda(), config))
        _assert_same_caches(stacked, alone)


@pytest.mark.parametrize("query_aware", ["auto", False])
def test_fused_statistics_give_the_reference_cache_on_cuda(query_aware):
    """``kernel="auto"`` computes the sinks' window shares and the span covariances with the fused
    Triton kernels (``kernels/triton_compress.py``), ``"reference"`` with the eager forms: in bf16 the
    same tokens are kept exact, and the span Keys agree up to the order of sums."""
    pytest.importorskip("triton")
    from rotatek_compile import RotateKConfig, state
    from tests.test_sinks import WINDOW

    fused, eager = (list(state.compress_layers(_prefills_on_cuda(), RotateKConfig(
        query_window=WINDOW, span="prompt", key_channels=4, query_aware=query_aware, kernel=kernel)))
        for kernel in ("auto", "reference"))
    _assert_same_caches(fused, eager)


@pytest.mark.parametrize("query_aware", ["auto", False])
def test_the_compression_queues_its_work_without_waiting_for_the_device(query_aware):
    """RotateK's compression reads the device once per group, for the token counts that
    ``count_tokens`` copies to pinned memory behind the queued work; once they are there,
    ``compress_counted`` queues everything else without a host synchronisation (the subspace
    solver's breakdowns are handled on the device). So a prefill can queue a group's compression
    while the device still runs its later layers (``rotatek_compile.prefill``)."""
    pytest.importorskip("triton")
    from rotatek_compile import RotateKConfig, state
    from tests.test_sinks import WINDOW

    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4, query_aware=query_aware)
    prefills = _prefills_on_cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts = state.count_tokens(prefills, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # the counts have arrived
    assert counts.ready()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layers = list(state.compress_counted(counts))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(layers) == 5 and all(isinstance(layer, state.CompressedLayer) for layer in layers)
    _assert_same_caches(layers, list(state.compress_layers(_prefills_on_cuda(), config)))


def _prefill_peak(model, input_ids: torch.Tensor, **cache) -> tuple[int, object]:
    """Bytes the prefill allocates at its peak beyond what was held before it, and its cache."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, output_cache(out)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_prefill_peak_is_below_the_uncompressed_one_on_cuda(cache, monkeypatch):
    """Each layer compressed inside the prefill graph, its full Keys freed there: the prefill's peak
    is lower than the uncompressed compiled prefill's by at least half the span Keys' pruned bytes
    of all layers but one (here a layer at a time: ``HELD_BYTES`` 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    import rotatek_compile
    from rotatek_compile import prefill
    from rotatek_compile.state import attached

    monkeypatch.setattr(prefill, "HELD_BYTES", {})
    torch.manual_seed(0)
    layers, kv_heads, dim, length, rank = 8, 8, 128, 8192, 32
    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=dim,
                         max_position_embeddings=2 * length)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    input_ids = torch.randint(0, 256, (1, length), device="cuda")

    def caches():
        return cache_kwargs(StaticCache(config=config, max_cache_len=length + 8)) if cache == "static" else {}

    peaks = {}
    for name, backend in (("inductor", "inductor"), ("rotatek", rotatek_compile.backend(key_channels=rank))):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        _prefill_peak(compiled, input_ids[:, : length // 2], **caches())  # compiled on another length
        peaks[name], kv = _prefill_peak(compiled, input_ids, **caches())
    torch._dynamo.reset()
    assert all(attached(layer.keys) is not None for layer in kv.layers)
    span_key_bytes = kv_heads * (length - 32) * dim * 2  # per layer, bf16
    pruned = (layers - 1) * span_key_bytes * (1 - rank / dim)
    assert peaks["rotatek"] <= peaks["inductor"] - pruned / 2, (peaks, pruned)
