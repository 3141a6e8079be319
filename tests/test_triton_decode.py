"""The fused Triton decode kernel against its eager twin ``reference.decode_attention``.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32/fp16,
small shapes); with CUDA the same properties run on the GPU, plus bf16 and CUDA-graph capture.
"""

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton decode kernel needs triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rotatek_compile.kernels import reference  # noqa: E402
from tests.triton_interpreted import kernel_module  # noqa: E402

triton_decode = kernel_module("triton_decode")  # under the CPU interpreter without CUDA

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per-dtype tolerance (max abs error; inputs are unit-variance, outputs are convex combinations of
# Values). fp32: interpreter dots are exact fp32 (GPU: "ieee" dots). fp16/bf16: P and qR rounded.
ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# GPU: every new shape compiles (~seconds), so fewer examples there.
CI = settings(max_examples=25 if DEVICE == "cpu" else 10, deadline=None, derandomize=True, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_inputs(batch, q_heads, kv_heads, dim, rank, value_dim, span_len, full_len, dtype=torch.float32,
                keep=0.8, strided=False, seed=0, device=DEVICE):
    """Random mixed-cache decode inputs (reference argument order). ``strided``: every tensor is a
    non-contiguous view ([B, S, H, x] storage transposed, sliced channels, every other mask entry)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):  # made on CPU (reproducible), moved before any view is taken
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def heads_last(b, h, s, x):  # [B, H, S, x] view of [B, S, H, 2x] storage
        if not strided:
            return randn(b, h, s, x)
        return randn(b, s, h, 2 * x)[..., ::2].transpose(1, 2)

    def token_mask(b, s):
        if not strided:
            return (torch.rand(b, s, generator=gen) < keep).to(device)
        return (torch.rand(b, 2 * s, generator=gen) < keep).to(device)[:, ::2]

    basis = torch.linalg.qr(torch.randn(batch, kv_heads, dim, dim, generator=gen))[0].to(device)
    rotation = basis[..., :rank]  # [B, H, d, r], orthonormal columns (non-contiguous when r < d)
    if not strided:
        rotation = rotation.contiguous()
    tensors = (
        randn(batch, q_heads, dim) if not strided else randn(batch, q_heads, 2 * dim)[..., ::2],
        heads_last(batch, kv_heads, span_len, rank),
        rotation,
        0.3 * torch.randn(batch, kv_heads, dim, generator=gen).to(device),
        heads_last(batch, kv_heads, span_len, value_dim),
        token_mask(batch, span_len),
        heads_last(batch, kv_heads, full_len, dim),
        heads_last(batch, kv_heads, full_len, value_dim),
        token_mask(batch, full_len),
    )
    return tensors + (1.0 / math.sqrt(dim),)


def check(inputs, num_splits=None, config=None, atol=None):
    out = triton_decode._decode_attention(*inputs, config=config, num_splits=num_splits)
    want = reference.decode_attention(*(t.double() if t.is_floating_point() else t for t in inputs[:-1]),
                                      inputs[-1])
    assert out.shape == want.shape and out.dtype == inputs[0].dtype
    assert torch.isfinite(out).all()
    tol = ATOL[inputs[0].dtype] if atol is None else atol
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)
    return out


@st.composite
def decode_shapes(draw):
    dim = draw(st.sampled_from([64, 128, 256]))
    rank = draw(st.sampled_from([r for r in (16, 32, 64, dim) if r <= dim]))
    kv_heads = draw(st.integers(1, 2))
    lengths = st.one_of(st.just(0), st.integers(1, 200), st.sampled_from([32, 64, 65, 127]))
    return dict(
        batch=draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.integers(1, 8)),
        dim=dim,
        rank=rank,
        value_dim=draw(st.sampled_from([dim, 64])),
        span_len=draw(lengths),
        full_len=draw(lengths),
        keep=draw(st.sampled_from([1.0, 0.7, 0.2])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@CI
@given(shape=decode_shapes(), num_splits=st.sampled_from([None, 1, 2, 5]), block_n=st.sampled_from([16, 32]),
       rotation_in_query_dtype=st.booleans())
def test_kernel_matches_reference(shape, num_splits, block_n, rotation_in_query_dtype):
    """Random shapes, GQA ratios 1–8, ranks ≤ d, empty and ragged segments, padding, strides,
    one split or several (merged by a second launch), ``R`` in fp32 or in the query's dtype."""
    config = triton_decode.DecodeConfig(block_n=block_n, num_warps=4, num_stages=2)
    inputs = list(make_inputs(**shape))
    if rotation_in_query_dtype:
        inputs[2] = inputs[2].to(inputs[0].dtype)
    check(tuple(inputs), num_splits=num_splits, config=config)


def test_full_rank_is_plain_attention():
    """``r = d``: R orthogonal, δμ = 0 ⇒ the mixed cache is ordinary attention over both segments."""
    q, span_keys, rotation, _, span_values, span_mask, keys, values, mask, scale = make_inputs(
        1, 4, 2, 64, 64, 64, 40, 9, keep=1.0)
    full_span_keys = span_keys @ rotation.transpose(-1, -2)  # K = K̃ Rᵀ
    out = triton_decode.decode_attention_triton(
        q, span_keys, rotation, torch.zeros_like(rotation[..., 0]), span_values, span_mask, keys, values, mask, scale)
    k = torch.cat([full_span_keys, keys], dim=2)
    v = torch.cat([span_values, values], dim=2)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, dense[:, :, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fully_masked_rows_give_zeros(num_splits):
    inputs = list(make_inputs(3, 4, 2, 64, 16, 64, 50, 20))
    inputs[5][1] = False  # row 1: nothing real in either segment
    inputs[8][1] = False
    inputs[5][2, :] = False  # row 2: only the full segment is real
    out = check(tuple(inputs), num_splits=num_splits)
    assert out[1].abs().max() == 0


def test_both_segments_empty():
    out = check(make_inputs(2, 4, 2, 64, 32, 64, 0, 0))
    assert out.abs().max() == 0


def test_half_precision():
    check(make_inputs(2, 8, 2, 128, 32, 128, 70, 21, dtype=torch.float16, strided=True), num_splits=3)


def test_half_precision_query_projection_on_tensor_cores():
    """``q`` and ``R`` both fp16, as the cache stores ``R``: ``qR`` is a dot of their own values."""
    inputs = list(make_inputs(2, 8, 2, 128, 32, 128, 70, 21, dtype=torch.float16, strided=True))
    inputs[2] = inputs[2].half()
    check(tuple(inputs), num_splits=3)


def test_the_query_projection_takes_r_in_slices():
    """d = 256, r = 256 in fp32: ``R`` is projected 32 rows at a time (a whole ``R`` would not
    fit in a GPU's shared memory)."""
    check(make_inputs(1, 2, 1, 256, 256, 256, 40, 9), num_splits=2)


def test_default_config_and_split_plan():
    """The public entry point plans its own splits; the plan covers every token, no empty split."""
    check(make_inputs(1, 4, 1, 128, 32, 128, 300, 40), atol=1e-4)
    config = triton_decode.DecodeConfig()
    for total in (1, 63, 64, 65, 16384 + 60, 131072 + 60):
        for rows in (1, 8, 128, 256, 4096):
            splits, per = triton_decode.plan_splits(total, rows, config.block_n, 132, config)
            assert per % config.block_n == 0 and splits >= 1
            assert (splits - 1) * per < total <= splits * per


@pytest.mark.parametrize("num_splits", [12, 44])
def test_many_splits(num_splits):
    """The merge launch takes every split at once; at 44 splits it also slices dv."""
    config = triton_decode.DecodeConfig(block_n=16, num_stages=2)
    check(make_inputs(1, 4, 1, 128, 32, 128, 640, 60, keep=0.9), num_splits=num_splits, config=config)


def test_rejects_bad_group():
    inputs = list(make_inputs(1, 4, 2, 64, 16, 64, 8, 8))
    inputs[0] = inputs[0][:, :3]
    with pytest.raises(ValueError, match="multiple of KV heads"):
        triton_decode.decode_attention_triton(*inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, span_len", [(2, 2000), (1, 16000)])
def test_gpu_paper_shape_and_cuda_graph(dtype, batch, span_len):
    """Paper head layout (Hq 32, H 8, d 128, r 32, R in the cache dtype): rel. L2 ≤ 1e-2, and
    the same output on every replay of a captured graph (at B1 16k the plan has ~65 splits,
    which the merge launch reads all at once)."""
    inputs = list(make_inputs(batch, 32, 8, 128, 32, 128, span_len, 60, dtype=dtype))
    inputs[2] = inputs[2].to(dtype)
    out = triton_decode.decode_attention_triton(*inputs)
    want = reference.decode_attention(*inputs)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() <= 1e-2
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_decode.decode_attention_triton(*inputs)  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_decode.decode_attention_triton(*inputs)
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, out, atol=0, rtol=0)
