"""``torch.ops.rotatek.*``: registration (``opcheck``), numerics against the reference, and use
inside ``torch.compile(fullgraph=True)`` graphs."""

import math

import pytest
import torch
import torch._inductor.exc
import torch.nn.functional as F

import rotatek_compile.ops  # noqa: F401  (registers torch.ops.rotatek.*)
from rotatek_compile.kernels import reference as ref

BATCH, KV_HEADS, GROUP, DIM, RANK, VALUE_DIM, SPAN, FULL = 2, 2, 2, 8, 3, 4, 5, 3


def _decode_args(seed=0, dtype=torch.float32):
    """Positional arguments of ``rotatek::decode_attention`` (reference order), small shapes."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(BATCH, KV_HEADS, SPAN, DIM, generator=gen) + 1.0
    span_mask = torch.rand(BATCH, SPAN, generator=gen) < 0.7
    span = ref.rotatek_compress(keys, RANK, span_mask, torch.randn(BATCH, KV_HEADS * GROUP, 4, DIM, generator=gen))
    mask = torch.rand(BATCH, FULL, generator=gen) < 0.7
    mask[:, -1] = True
    return (
        torch.randn(BATCH, KV_HEADS * GROUP, DIM, generator=gen).to(dtype),  # query [B, Hq, d]
        span.keys.to(dtype),  # K̃ [B, H, Sv, r]
        span.rotation,  # R [B, H, d, r]
        span.mean_residual,  # δμ [B, H, d]
        torch.randn(BATCH, KV_HEADS, SPAN, VALUE_DIM, generator=gen).to(dtype),
        span_mask,
        torch.randn(BATCH, KV_HEADS, FULL, DIM, generator=gen).to(dtype),
        torch.randn(BATCH, KV_HEADS, FULL, VALUE_DIM, generator=gen).to(dtype),
        mask,
        1 / math.sqrt(DIM),
    )


def _sparse_args(seed=0):
    """Positional arguments of ``rotatek::sparse_decode_attention`` and the uncompressed span Keys."""
    gen = torch.Generator().manual_seed(seed)
    span_keys = torch.randn(BATCH, KV_HEADS, SPAN, DIM, generator=gen)
    sparse = ref.spark_select(span_keys, torch.randn(BATCH, KV_HEADS * GROUP, 4, DIM, generator=gen), RANK)
    query, _, _, _, span_values, span_mask, keys, values, mask, scale = _decode_args(seed + 1)
    return (query, sparse.values, sparse.channels, sparse.fill, span_values, span_mask, keys, values, mask,
            scale)


@pytest.mark.parametrize("kwargs", [{}, {"implementation": "reference"}], ids=["default", "implementation=reference"])
def test_opcheck_decode_attention(kwargs):
    torch.library.opcheck(torch.ops.rotatek.decode_attention.default, _decode_args(), kwargs)


def test_opcheck_sparse_decode_attention():
    torch.library.opcheck(torch.ops.rotatek.sparse_decode_attention.default, _sparse_args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_op_equals_reference(dtype):
    args = _decode_args(dtype=dtype)
    out = torch.ops.rotatek.decode_attention(*args)
    assert out.dtype == dtype and out.shape == (BATCH, KV_HEADS * GROUP, VALUE_DIM)
    torch.testing.assert_close(out, ref.decode_attention(*args), atol=0, rtol=0)
    torch.testing.assert_close(torch.ops.rotatek.decode_attention(*args, implementation="reference"), out, atol=0, rtol=0)


def test_sparse_decode_op_equals_attention_on_reconstructed_keys():
    args = _sparse_args()
    query, values_kept, channels, fill, span_values, span_mask, keys, values, mask, scale = args
    out = torch.ops.rotatek.sparse_decode_attention(*args)
    full = ref.spark_reconstruct(ref.SparseKeys(values_kept, channels, fill), DIM)  # [B, H, Sv, d]
    valid = torch.cat([span_mask, mask], dim=-1)[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        query[:, :, None], torch.cat([full, keys], 2), torch.cat([span_values, values], 2), attn_mask=valid,
        scale=scale, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _as_chunk(args, new_tokens, seed=3):
    """``args`` with a ``[B, Hq, T, d]`` query whose tokens are the last ``T`` of the rest segment."""
    gen = torch.Generator().manual_seed(seed)
    query = args[0]
    chunk = torch.randn(*query.shape[:2], new_tokens, query.shape[-1], generator=gen).to(query.dtype)
    return (chunk, *args[1:])


@pytest.mark.parametrize("op, make_args", [("decode_attention", _decode_args), ("sparse_decode_attention", _sparse_args)])
def test_opcheck_chunk_query(op, make_args):
    torch.library.opcheck(getattr(torch.ops.rotatek, op).default, _as_chunk(make_args(), 2))


@pytest.mark.parametrize("op, make_args", [("decode_attention", _decode_args), ("sparse_decode_attention", _sparse_args)])
def test_chunk_equals_one_token_steps(op, make_args):
    # query t of a T-token chunk sees the span and the rest up to its own token (the T last are
    # the chunk's): exactly a one-token step on the rest cut after that token
    new_tokens = 3
    args = _as_chunk(make_args(), new_tokens)
    query, *span, keys, values, mask, scale = args
    out = getattr(torch.ops.rotatek, op)(*args)
    assert out.shape == (*query.shape[:-1], values.shape[-1])
    full = keys.shape[2]
    for t in range(new_tokens):
        cut = full - new_tokens + t + 1
        step = getattr(torch.ops.rotatek, op)(query[:, :, t], *span, keys[:, :, :cut], values[:, :, :cut],
                                              mask[:, :cut], scale)
        torch.testing.assert_close(out[:, :, t], step, atol=1e-6, rtol=1e-5)


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest new tensor any aten op returns (views and
    results that alias an input do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("op", ["decode_attention", "sparse_decode_attention"])
def test_cpu_decode_copies_nothing_cache_sized(op):  # the CPU path of the two ops
    # A decode step must read the cache where it lies: no concatenation of span and rest Values,
    # no full-width rebuild of SparK Keys. Long span, d = dv = 64, r = 16, G = 2: the largest
    # temporary allowed is the logits-sized one, far below one segment of Values.
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, group, dim, rank, span_len, rest_len = 2, 2, 2, 64, 16, 512, 8
    span_keys = torch.randn(batch, kv_heads, span_len, dim, generator=gen)
    window = torch.randn(batch, kv_heads * group, 4, dim, generator=gen)
    if op == "decode_attention":
        span_key_parts = tuple(ref.rotatek_compress(span_keys, rank, None, window))
    else:
        span_key_parts = tuple(ref.spark_select(span_keys, window, rank))
    span_values = torch.randn(batch, kv_heads, span_len, dim, generator=gen)
    args = (torch.randn(batch, kv_heads * group, dim, generator=gen), *span_key_parts, span_values,
            torch.ones(batch, span_len, dtype=torch.bool), torch.randn(batch, kv_heads, rest_len, dim, generator=gen),
            torch.randn(batch, kv_heads, rest_len, dim, generator=gen), torch.ones(batch, rest_len, dtype=torch.bool),
            0.125)
    with _LargestAllocation() as mode:
        getattr(ref, op)(*args)
    assert mode.largest < span_values.numel() // 2, (mode.largest, span_values.numel())


def _decode_then_project(query, span_keys, rotation, mean_residual, span_values, span_mask, keys, values, mask):
    out = torch.ops.rotatek.decode_attention(query * 2, span_keys, rotation, mean_residual, span_values,
                                             span_mask, keys, values, mask, 0.25)
    return out.sum(-1).relu()


def _eager_twin(query, span_keys, rotation, mean_residual, span_values, span_mask, keys, values, mask):
    out = ref.decode_attention(query * 2, span_keys, rotation, mean_residual, span_values, span_mask, keys,
                               values, mask, 0.25)
    return out.sum(-1).relu()


def test_decode_op_in_fullgraph_compile_eager_backend():
    args = _decode_args()[:-1]
    torch._dynamo.reset()
    compiled = torch.compile(_decode_then_project, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), _eager_twin(*args))
    other = _decode_args(seed=7)[:-1]  # same shapes, new values: no recompile needed, same answer
    torch.testing.assert_close(compiled(*other), _eager_twin(*other))


def test_sparse_op_in_fullgraph_compile_eager_backend():
    def fn(*args):
        return torch.ops.rotatek.sparse_decode_attention(*args) + 1

    args = _sparse_args()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), torch.ops.rotatek.sparse_decode_attention(*args) + 1)


def _decode_with_kernel(kernel):
    def fn(query, span_keys, rotation, mean_residual, span_values, span_mask, keys, values, mask):
        extra = () if kernel is None else (kernel,)  # positional, as the decode rewrite emits it
        out = torch.ops.rotatek.decode_attention(query * 2, span_keys, rotation, mean_residual, span_values,
                                                 span_mask, keys, values, mask, 0.25, *extra)
        return out.sum(-1).relu()

    return fn


def test_decode_op_in_fullgraph_compile_inductor():
    # The op stays opaque to Inductor: the graph around it is compiled, the op runs the reference.
    args = _decode_args()[:-1]
    torch._dynamo.reset()
    compiled = torch.compile(_decode_with_kernel("reference"), fullgraph=True)
    torch.testing.assert_close(compiled(*args), _eager_twin(*args))


@pytest.mark.parametrize("kernel", [None, "auto"], ids=["kernel-omitted", "kernel=auto"])
def test_decode_op_with_default_kernel_in_fullgraph_compile_inductor(kernel):
    args = _decode_args()[:-1]
    torch._dynamo.reset()
    compiled = torch.compile(_decode_with_kernel(kernel), fullgraph=True)
    torch.testing.assert_close(compiled(*args), _eager_twin(*args))
