"""``query_aware="auto"``: each row and KV head keeps the query-aware basis or K-only PCA, whichever
moves the window's attention less (``state._better_basis``).

Two constructed KV heads, one where each basis fails: head 0 has Keys of rank 4 ≤ r (K-only PCA
reconstructs them exactly; the query-aware basis, the top of ``D C D`` with ``D`` the query norms,
spans ``D·range(C)`` instead), head 1 has high-variance Key channels that the queries never read
(K-only PCA keeps those; the query-aware basis keeps the channels the queries use).
"""

from __future__ import annotations

import math

import pytest
import torch

from rotatek_compile import RotateKConfig
from rotatek_compile.kernels import reference
from rotatek_compile.state import compress_layer

DIM, RANK, WINDOW, GROUP, LENGTH, BATCH = 16, 8, 8, 2, 200, 2


def head_queries(gen: torch.Generator, count: int) -> torch.Tensor:
    """``[B, 2·G, count, d]``: head 0's group reads every channel, head 1's only channels 8–15."""
    queries = torch.randn(BATCH, 2 * GROUP, count, DIM, generator=gen)
    queries[:, GROUP:, :, :DIM // 2] *= 0.01
    queries[:, GROUP:, :, DIM // 2:] *= 3
    return queries


def layer_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    low_rank = 2 * torch.randn(BATCH, LENGTH, 4, generator=gen) @ torch.randn(BATCH, 4, DIM, generator=gen)
    loud_unread = torch.randn(BATCH, LENGTH, DIM, generator=gen)
    loud_unread[..., :DIM // 2] *= 10
    keys = torch.stack([low_rank, loud_unread], dim=1)  # [B, 2, S, d]
    values = torch.randn(BATCH, 2, LENGTH, DIM, generator=gen)
    valid = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    span = torch.arange(LENGTH)[None, :].expand(BATCH, -1) < LENGTH - WINDOW
    return keys, values, head_queries(gen, WINDOW), span, valid


def decode_error_per_head(query_aware) -> list[float]:
    """Relative error of the decode output of fresh queries, per KV head, against exact attention."""
    keys, values, queries, span, valid = layer_inputs()
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=RANK, query_aware=query_aware)
    layer = compress_layer(keys, values, queries, span, valid, config, scale=DIM ** -0.5)
    query = head_queries(torch.Generator().manual_seed(1), 1)[:, :, 0]  # [B, Hq, d]
    out = reference.decode_attention(query, *layer.span_key_parts, layer.span_values, layer.span_mask,
                                     layer.keys, layer.values, layer.mask, DIM ** -0.5)  # [B, Hq, d]
    q = query.double().view(BATCH, 2, GROUP, DIM)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.double()) * DIM ** -0.5
    probs = logits.masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1)
    expected = torch.einsum("bhgs,bhsd->bhgd", probs, values.double())  # [B, H, G, d]
    error = (out.double().view(BATCH, 2, GROUP, DIM) - expected).square().sum(dim=(0, 2, 3))
    return (error / expected.square().sum(dim=(0, 2, 3))).tolist()


def test_each_head_keeps_the_basis_that_reproduces_its_attention():
    k_only, query_aware, auto = (decode_error_per_head(choice) for choice in (False, True, "auto"))
    assert k_only[0] < 1e-8 and query_aware[0] > 1e-3  # rank-4 Keys: only K-only PCA is exact
    assert query_aware[1] < k_only[1] / 10  # unread loud channels: the query-aware basis is far better
    assert auto[0] == pytest.approx(k_only[0], abs=1e-8)
    assert auto[1] == pytest.approx(query_aware[1], rel=1e-6)


def test_the_choice_is_exact_at_full_rank():
    keys, values, queries, span, valid = layer_inputs()
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=DIM)
    layer = compress_layer(keys, values, queries, span, valid, config, scale=DIM ** -0.5)
    query = torch.randn(BATCH, 2 * GROUP, DIM, generator=torch.Generator().manual_seed(2))
    out = reference.decode_attention(query, *layer.span_key_parts, layer.span_values, layer.span_mask,
                                     layer.keys, layer.values, layer.mask, DIM ** -0.5)
    expected = reference.decode_attention(query, keys, torch.eye(DIM).expand(BATCH, 2, DIM, DIM), torch.zeros(
        BATCH, 2, DIM), values, valid, keys[:, :, :0], values[:, :, :0], valid[:, :0], DIM ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_attention_error_is_that_of_the_reconstructed_keys():
    """``basis_attention_error`` attends with projected queries and Keys (``(qR)·(kR)``: the mean's
    terms are the same for every Key); it equals the error of attention over the Keys each basis
    reconstructs, ``RRᵀ(k − μ) + μ``, with padding."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(BATCH, 2, 40, DIM, generator=gen), torch.randn(BATCH, 2, 40, 12, generator=gen)
    queries = torch.randn(BATCH, 2 * GROUP, 5, DIM, generator=gen)
    mask = torch.ones(BATCH, 40, dtype=torch.bool)
    mask[1, 31:] = False
    rotations = torch.linalg.qr(torch.randn(3, BATCH, 2, DIM, RANK, generator=gen)).Q  # [n, B, H, d, r]
    mean = torch.randn(BATCH, 2, DIM, generator=gen)

    q = queries.double().view(BATCH, 2, GROUP * 5, DIM) * 0.3
    hidden = ~mask[:, None, None, :]
    exact = (q @ keys.double().transpose(-1, -2)).masked_fill(hidden, -math.inf).softmax(-1) @ values.double()
    expected = []
    for basis in rotations.double():
        seen = (keys.double() - mean.double()[:, :, None]) @ basis @ basis.transpose(-1, -2) + mean.double()[:, :, None]
        out = (q @ seen.transpose(-1, -2)).masked_fill(hidden, -math.inf).softmax(-1) @ values.double()
        expected.append((out - exact).square().sum(dim=(-2, -1)) / exact.square().sum(dim=(-2, -1)))
    errors = reference.basis_attention_error(queries, keys, values, mask, 0.3, rotations)
    torch.testing.assert_close(errors.double(), torch.stack(expected), rtol=1e-4, atol=1e-7)
    # no mask (no padding slot): the fused attention without a mask, same errors for the full row
    unmasked = reference.basis_attention_error(queries, keys, values, None, 0.3, rotations)
    torch.testing.assert_close(unmasked[:, 0].double(), torch.stack(expected)[:, 0], rtol=1e-4, atol=1e-7)
