"""The compiled model on CUDA (tiny Llama): the Triton decode kernel for one-token steps, the
reference for chunks, every method, eager and Inductor. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from rotatek_compile import RotateKBackend, RotateKConfig
from rotatek_compile.state import attached
from tests.test_generate import HEAD_DIM, chunk_then_step, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt_and_chunk(seed: int = 11):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 128, (2, 48), generator=generator).cuda()
    chunk = torch.randint(0, 128, (2, 6), generator=generator).cuda()
    return prompt, chunk


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("method", ["rotatek", "think", "spark"])
def test_full_rank_matches_uncompiled_on_cuda(method, inner):
    prompt, chunk = _prompt_and_chunk()
    model = tiny_llama().cuda()
    exact_logits, exact_last, _ = chunk_then_step(model, prompt, chunk)
    model.compile(backend=RotateKBackend(RotateKConfig(key_channels=HEAD_DIM, method=method), inner=inner))
    logits, last, cache = chunk_then_step(model, prompt, chunk)
    assert all(attached(layer.keys) is not None for layer in cache.layers)
    assert (logits - exact_logits).abs().max().item() < 1e-3
    assert (last - exact_last).abs().max().item() < 1e-3


@pytest.mark.parametrize("method", ["rotatek", "think", "spark"])
def test_chunk_equals_token_by_token_on_cuda(method):
    # a one-token step runs the Triton kernel (rotatek, think), a chunk the reference: they agree
    from tests.test_generate import decode, prefill

    prompt, chunk = _prompt_and_chunk(12)
    model = tiny_llama().cuda()
    model.compile(backend=RotateKBackend(RotateKConfig(key_channels=4, method=method), inner="eager"))
    chunk_logits, _, _ = chunk_then_step(model, prompt, chunk)
    _, stepped = prefill(model, prompt)
    steps = torch.stack([decode(model, chunk[:, t: t + 1], stepped)[1] for t in range(chunk.shape[1])], dim=1)
    torch.testing.assert_close(chunk_logits, steps, atol=1e-3, rtol=1e-3)
