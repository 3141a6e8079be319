"""Every Triton entry point launches on the device of its inputs, not on the current device: a
model spread over several GPUs (``device_map="auto"``) runs layers whose tensors live on another
GPU than the current one (``kernels.on_inputs_device``). All but the first test need two CUDA devices."""

import pytest
import torch

from rotatek_compile import kernels, tiers
from rotatek_compile.kernels import reference

OTHER = torch.device("cuda", 1)
two_devices = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def test_the_guard_finds_the_first_tensor_and_passes_cpu_calls_through():
    seen = []
    launch = kernels.on_inputs_device(lambda *args, **kwargs: seen.append((args, kwargs)) or "done")
    x = torch.zeros(2)
    assert kernels._first_tensor((0.5, [x, torch.ones(1)], x)) is x
    assert kernels._first_tensor((0.5, [], "text")) is None
    assert launch(1.0, [x], scale=2) == "done" and seen == [((1.0, [x]), {"scale": 2})]


@pytest.fixture
def current_device_is_the_first():
    with torch.cuda.device(0):
        yield


@two_devices
@pytest.mark.usefixtures("current_device_is_the_first")
@pytest.mark.parametrize("batch", [1, 5])
def test_grouped_linear_on_another_device(batch):
    from rotatek_compile.kernels import triton_gemv

    x = torch.randn(batch, 256, device=OTHER, dtype=torch.bfloat16)
    weights = [torch.randn(n, 256, device=OTHER, dtype=torch.bfloat16) for n in (64, 32)]
    got = triton_gemv.grouped_linear_triton(x, weights, tile=(16, 64))
    torch.cuda.synchronize(OTHER)
    assert torch.cuda.current_device() == 0
    for y, w in zip(got, weights):
        assert y.device == OTHER
        torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


@two_devices
@pytest.mark.usefixtures("current_device_is_the_first")
def test_decode_attention_on_another_device():
    from rotatek_compile.kernels import triton_decode
    from tests.test_triton_decode import make_inputs

    inputs = make_inputs(2, 4, 2, 32, 8, 32, 100, 20, dtype=torch.float16, device=OTHER)
    got = triton_decode.decode_attention_triton(*inputs)
    want = reference.decode_attention(*(t.double() if t.is_floating_point() else t for t in inputs[:-1]), inputs[-1])
    assert got.device == OTHER
    torch.testing.assert_close(got.double(), want, atol=5e-3, rtol=0)


@two_devices
@pytest.mark.usefixtures("current_device_is_the_first")
def test_compression_statistics_on_another_device():
    from rotatek_compile.kernels import triton_compress

    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 8, 32, generator=gen).to(OTHER, torch.float16)
    keys = (torch.randn(1, 2, 200, 32, generator=gen) + 1.0).to(OTHER, torch.float16)
    span = torch.rand(1, 200, generator=gen).to(OTHER) > 0.2
    share = triton_compress.window_share_triton(queries, keys, 0.3, span)
    torch.testing.assert_close(share, tiers.window_share(queries, keys, 0.3, span, kernel="reference"),
                               atol=1e-4, rtol=1e-4)
    cov, mean = triton_compress.span_covariance_triton(keys, span)
    want_cov, want_mean = reference.span_covariance(keys, span)
    torch.testing.assert_close(cov / want_cov.abs().amax(), want_cov / want_cov.abs().amax(), atol=1e-4, rtol=0)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-5)


@two_devices
@pytest.mark.usefixtures("current_device_is_the_first")
def test_layers_on_two_devices_are_not_batched_into_one_launch():
    from rotatek_compile.kernels import triton_compress

    keys = [torch.randn(1, 2, 64, 16, device=device) for device in ("cuda:0", OTHER)]
    masks = [torch.ones(1, 64, dtype=torch.bool, device=k.device) for k in keys]
    with pytest.raises(ValueError, match="device"):
        triton_compress.span_covariances_triton(keys, masks)
