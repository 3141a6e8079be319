"""The fused compression statistics (window shares, span covariance) against their eager twins.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32/fp16, small
shapes); with CUDA the same checks run on the GPU, plus bf16 and the dispatch from ``kernel``.
"""


import pytest
import torch

pytest.importorskip("triton", reason="the Triton compression kernels need triton")

from rotatek_compile import kernels, tiers  # noqa: E402
from rotatek_compile.kernels import reference  # noqa: E402
from tests.triton_interpreted import kernel_module  # noqa: E402

triton_compress = kernel_module("triton_compress")  # under the CPU interpreter without CUDA

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (B, Hq, H, W, S, d): one row block and several (G·W = 80 > 64 rows), S not a multiple of the
# 64-token tiles, d not a power of two, a span shorter than one tile
SHAPES = [(2, 4, 2, 8, 200, 16), (1, 8, 2, 20, 130, 24), (1, 2, 2, 3, 5, 32)]


def _inputs(batch, q_heads, kv_heads, window, length, dim, dtype, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    queries = (2 * torch.randn(batch, q_heads, window, dim, generator=gen)).to(DEVICE, dtype)
    if strided:  # [B, S, H, 2d] storage seen as [B, H, S, d]: every stride differs from contiguous
        keys = torch.randn(batch, length, kv_heads, 2 * dim, generator=gen).to(DEVICE, dtype)[..., ::2].transpose(1, 2)
    else:
        keys = torch.randn(batch, kv_heads, length, dim, generator=gen).to(DEVICE, dtype)
    span = torch.rand(batch, length, generator=gen).to(DEVICE) > 0.2
    span[:, 0] = True
    return queries, keys, span


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_window_share_equals_the_eager_softmax(shape, dtype):
    queries, keys, span = _inputs(*shape, dtype, strided=shape[0] == 1)
    fused = triton_compress.window_share_triton(queries, keys, 0.3, span)
    expected = tiers.window_share(queries, keys, 0.3, span, kernel="reference")
    assert fused.shape == expected.shape == (shape[0], shape[2], shape[4]) and fused.dtype == torch.float32
    # fp32: exact dots in both; half inputs: both take the same products, summed in another order
    torch.testing.assert_close(fused, expected, atol=1e-6 if dtype == torch.float32 else 1e-4, rtol=1e-4)
    assert torch.all(fused[~span[:, None, :].expand_as(fused)] == 0)  # nothing outside the span
    torch.testing.assert_close(fused.sum(-1), torch.ones_like(fused.sum(-1)), atol=1e-4, rtol=0)


def test_window_share_of_a_row_without_span_tokens_is_zero(monkeypatch):
    queries, keys, span = _inputs(2, 4, 2, 8, 300, 16, torch.float32)
    span[1] = False
    monkeypatch.setattr(triton_compress, "TARGET_PROGRAMS", 64)  # several chunks per (row block, head)
    fused = triton_compress.window_share_triton(queries, keys, 0.3, span)
    assert torch.all(fused[1] == 0) and torch.isfinite(fused).all()
    torch.testing.assert_close(fused, tiers.window_share(queries, keys, 0.3, span, kernel="reference"),
                               atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunks", [1, 3])
def test_window_share_splits_the_keys_into_chunks_without_changing_the_result(monkeypatch, chunks):
    queries, keys, span = _inputs(1, 4, 2, 8, 64 * 5, 16, torch.float32, seed=1)
    monkeypatch.setattr(triton_compress, "TARGET_PROGRAMS", 2 * chunks)  # 1 row block x 2 heads x chunks
    assert triton_compress._chunking(5, 2, 2 * chunks)[0] == chunks
    fused = triton_compress.window_share_triton(queries, keys, 0.3, span)
    torch.testing.assert_close(fused, tiers.window_share(queries, keys, 0.3, span, kernel="reference"),
                               atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["mask [B,S]", "mask [B,H,S]"])
@pytest.mark.parametrize("shape", [(2, 2, 200, 16), (1, 3, 70, 24)], ids=str)
def test_span_covariance_equals_the_eager_form(shape, per_head, dtype):
    batch, heads, length, dim = shape
    gen = torch.Generator().manual_seed(2)
    keys = (torch.randn(*shape, generator=gen) + 3.0).to(DEVICE, dtype)  # an offset mean: centring matters
    mask = torch.rand(*((batch, heads, length) if per_head else (batch, length)), generator=gen).to(DEVICE) > 0.3
    cov, mean = triton_compress.span_covariance_triton(keys, mask)
    expected_cov, expected_mean = reference.span_covariance(keys, mask)
    assert cov.shape == (batch, heads, dim, dim) and cov.dtype == torch.float32
    assert torch.equal(cov, cov.transpose(-1, -2))
    scale = expected_cov.abs().amax()
    # both centre about the mean rounded to the Keys' dtype; sums in another order
    torch.testing.assert_close(cov / scale, expected_cov / scale, atol=1e-6 if dtype == torch.float32 else 1e-4,
                               rtol=0)
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=1e-5)


def test_span_covariance_of_a_row_without_tokens_is_zero(monkeypatch):
    keys = torch.randn(2, 2, 300, 16, device=DEVICE)
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    monkeypatch.setattr(triton_compress, "GRAM_PROGRAMS", 12)  # 3 chunks per row and head
    cov, mean = triton_compress.span_covariance_triton(keys, mask)
    assert torch.all(cov[1] == 0) and torch.all(mean[1] == 0)
    torch.testing.assert_close(cov, reference.span_covariance(keys, mask)[0], atol=1e-4, rtol=1e-5)


def test_the_kernel_option_picks_the_statistics_kernels():
    device = torch.device(DEVICE)
    assert kernels.compress_kernels(device, "reference") is None
    assert kernels.compress_kernels(torch.device("cpu"), "auto") is None  # the CPU path is the reference
    if DEVICE == "cuda":
        assert kernels.compress_kernels(device, "auto") is not None


def _separate_layers(count, shape, dtype, offset=0.0):
    """``count`` layers' Keys, each its own allocation (as a model's are), and a view of a larger
    buffer: the kernels reach each layer by its offset from the first's."""
    gen = torch.Generator().manual_seed(3)
    layers = [(torch.randn(*shape, generator=gen) + offset).to(DEVICE, dtype) for _ in range(count - 1)]
    wide = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) + offset).to(DEVICE, dtype)
    layers.insert(1, wide[..., : shape[-1]].contiguous())  # same strides as the others
    return layers


def test_window_shares_of_several_layers_in_one_call_equal_each_layer_alone():
    batch, q_heads, kv_heads, window, length, dim = 2, 4, 2, 8, 150, 16
    keys = _separate_layers(3, (batch, kv_heads, length, dim), torch.float32)
    gen = torch.Generator().manual_seed(4)
    queries = [torch.randn(batch, q_heads, window, dim, generator=gen).to(DEVICE) for _ in keys]
    spans = [torch.rand(batch, length, generator=gen).to(DEVICE) > p for p in (0.1, 0.5, 0.9)]
    shares = triton_compress.window_shares_triton(queries, keys, 0.3, spans)
    assert shares.shape == (3, batch, kv_heads, length)
    for layer, (q, k, span) in enumerate(zip(queries, keys, spans)):
        torch.testing.assert_close(shares[layer], tiers.window_share(q, k, 0.3, span, kernel="reference"),
                                   atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("per_head", [False, True], ids=["mask [B,S]", "mask [B,H,S]"])
def test_span_covariances_of_several_layers_in_one_call_equal_each_layer_alone(per_head):
    batch, kv_heads, length, dim = 2, 2, 130, 16
    keys = _separate_layers(3, (batch, kv_heads, length, dim), torch.float32, offset=3.0)
    gen = torch.Generator().manual_seed(5)
    masks = [torch.rand(*((batch, kv_heads, length) if per_head else (batch, length)), generator=gen).to(DEVICE) > 0.4
             for _ in keys]
    cov, mean = triton_compress.span_covariances_triton(keys, masks)
    assert cov.shape == (3, batch, kv_heads, dim, dim) and mean.shape == (3, batch, kv_heads, dim)
    for layer, (k, m) in enumerate(zip(keys, masks)):
        expected_cov, expected_mean = reference.span_covariance(k, m)
        scale = expected_cov.abs().amax()
        torch.testing.assert_close(cov[layer] / scale, expected_cov / scale, atol=1e-6, rtol=0)
        torch.testing.assert_close(mean[layer], expected_mean, atol=1e-5, rtol=1e-5)


def test_layers_of_other_shapes_in_one_call_are_refused():
    keys = [torch.randn(1, 2, 64, 16, device=DEVICE), torch.randn(1, 2, 65, 16, device=DEVICE)]
    masks = [torch.ones(1, 64, dtype=torch.bool, device=DEVICE), torch.ones(1, 65, dtype=torch.bool, device=DEVICE)]
    with pytest.raises(ValueError, match="one shape, strides, dtype and device"):
        triton_compress.span_covariances_triton(keys, masks)
