"""Attention sinks never enter the compressed span (``rotatek_compile.tiers``), for every method.

Synthetic layers (no model): random post-RoPE Keys, Values and window queries, left-padded rows,
the text span (each row's prompt minus its last ``W`` tokens). Tokens are told apart by their
Values, which are random and so unique.
"""

from __future__ import annotations

import math

import pytest
import torch

from rotatek_compile import tiers
from rotatek_compile.config import RotateKConfig
from rotatek_compile.kernels import reference
from rotatek_compile.state import compress_layer

DIM, WINDOW, KV_HEADS, GROUP = 16, 4, 2, 2


def layer_inputs(padding=(0, 5, 9), length=160, seed=0, sink=None):
    """Keys ``[B, H, S, d]``, Values, window queries ``[B, Hq, W, d]``, span, valid.

    ``sink``: a position (counted from each row's first real token) whose Key is aligned with the
    window queries, so that it takes most of their attention.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(padding)
    keys = torch.randn(batch, KV_HEADS, length, DIM, generator=gen)
    values = torch.randn(batch, KV_HEADS, length, DIM, generator=gen)
    queries = torch.randn(batch, KV_HEADS * GROUP, WINDOW, DIM, generator=gen)
    valid = torch.arange(length)[None, :] >= torch.tensor(padding)[:, None]  # [B, S] left padding
    if sink is not None:
        direction = queries.mean(dim=2).view(batch, KV_HEADS, GROUP, DIM).mean(dim=2)  # [B, H, d]
        for row, pad in enumerate(padding):
            keys[row, :, pad + sink] = 12 * direction[row] / direction[row].norm(dim=-1, keepdim=True)
    from_end = valid.flip(-1).cumsum(-1).flip(-1)
    span = valid & (from_end > WINDOW)
    return keys, values, queries, span, valid


def compress(keys, values, queries, span, valid, **options):
    config = RotateKConfig(query_window=WINDOW, span="prompt", **options)
    return compress_layer(keys, values, queries, span, valid, config, scale=DIM ** -0.5)


def rest_tokens(layer, values, row):
    """Positions (in the prompt) of the real tokens in the rest segment of ``row``."""
    kept = layer.values[row, 0][layer.mask[row]]  # [n, dv]
    return {int((values[row, 0] == v).all(-1).nonzero()) for v in kept}


def span_tokens(layer, values, row):
    kept = layer.span_values[row, 0][layer.span_mask[row]]
    return {int((values[row, 0] == v).all(-1).nonzero()) for v in kept}


@pytest.mark.parametrize("method", ["rotatek", "think", "spark"])
def test_first_real_token_of_each_row_is_exact(method):
    padding = (0, 5, 9)
    keys, values, queries, span, valid = layer_inputs(padding)
    layer = compress(keys, values, queries, span, valid, key_channels=4, method=method)
    for row, pad in enumerate(padding):
        assert pad in rest_tokens(layer, values, row)  # the first real token, after the padding
        assert pad not in span_tokens(layer, values, row)
        # every real token is in exactly one segment
        assert rest_tokens(layer, values, row) | span_tokens(layer, values, row) == set(range(pad, 160))
        assert not rest_tokens(layer, values, row) & span_tokens(layer, values, row)


def test_an_outlier_of_the_window_attention_is_exact():
    # a token 7 positions in takes most of the window's attention: it stays exact, in every row
    padding = (0, 5, 9)
    keys, values, queries, span, valid = layer_inputs(padding, sink=7)
    share = tiers.window_share(queries, keys, DIM ** -0.5, span).amax(1)  # [B, S]
    for row, pad in enumerate(padding):
        assert share[row, pad + 7] >= tiers.SINK_SHARE
    layer = compress(keys, values, queries, span, valid, key_channels=4)
    for row, pad in enumerate(padding):
        assert pad + 7 in rest_tokens(layer, values, row)
        assert pad + 7 not in span_tokens(layer, values, row)


def test_rows_of_a_batch_take_equally_many_sinks():
    # row 0 has an outlier 7 tokens in, row 1 none: row 1 also keeps its next token by share exact,
    # so that neither segment gets a padding slot
    keys, values, queries, span, valid = layer_inputs((0, 5), sink=7)
    keys[1] = torch.randn(keys[1].shape, generator=torch.Generator().manual_seed(8))
    share = tiers.window_share(queries, keys, DIM ** -0.5, span).amax(1)  # [B, S]
    assert share[0, 7] >= tiers.SINK_SHARE and share[1].max() < tiers.SINK_SHARE
    sinks = tiers.attention_sinks(queries, keys, DIM ** -0.5, span, valid)
    assert sinks.sum(1).tolist() == [2, 2]
    assert sinks[0, 0] and sinks[0, 7] and sinks[1, 5]
    candidates = share[1].masked_fill(~span[1], -1.0)
    candidates[5] = -1.0  # the first real token is taken anyway
    assert sinks[1, candidates.argmax()]


def test_only_the_first_token_when_no_token_stands_out():
    keys, values, queries, span, valid = layer_inputs((0, 3), seed=1)
    share = tiers.window_share(queries, keys, DIM ** -0.5, span)
    assert share.max() < tiers.SINK_SHARE  # random Keys: no outlier
    sinks = tiers.attention_sinks(queries, keys, DIM ** -0.5, span, valid)
    assert sinks.sum(1).tolist() == [1, 1]
    assert sinks[0, 0] and sinks[1, 3]


def test_a_short_span_has_no_outliers_by_share_alone():
    # 20 span tokens: uniform attention gives each 0.05, random Keys push some past 10%; a sink
    # must also take 10× the uniform share (here 0.5), which none does
    keys, values, queries, span, valid = layer_inputs((0,), length=20 + WINDOW, seed=4)
    share = tiers.window_share(queries, keys, DIM ** -0.5, span).amax(1)[0]
    assert (share[1:] >= tiers.SINK_SHARE).any() and share[1:].max() < tiers.SINK_FACTOR / 20
    assert tiers.attention_sinks(queries, keys, DIM ** -0.5, span, valid).nonzero().tolist() == [[0, 0]]


def test_sinks_are_capped_per_row():
    keys, values, queries, span, valid = layer_inputs((0,), seed=2)
    keys[:, :, 1:7] = 0.0  # equal logits for 6 tokens...
    keys[:, :, 7:] = -50 * queries.mean(dim=2).view(1, KV_HEADS, GROUP, DIM).mean(2)[:, :, None]  # ...the rest unattended
    sinks = tiers.attention_sinks(queries, keys, DIM ** -0.5, span, valid)
    assert (tiers.window_share(queries, keys, DIM ** -0.5, span).amax(1)[0, 1:7] >= tiers.SINK_SHARE).sum() == 6
    assert sinks.sum() == tiers.SINK_LIMIT


@pytest.mark.parametrize("method", ["rotatek", "think", "spark"])
def test_full_rank_with_sinks_is_exact(method):
    keys, values, queries, span, valid = layer_inputs((0, 5, 9), sink=3)
    layer = compress(keys, values, queries, span, valid, key_channels=DIM, method=method)
    query = torch.randn(3, KV_HEADS * GROUP, DIM, generator=torch.Generator().manual_seed(5))
    out = decode(layer, query)
    expected = plain_attention(query, keys, values, valid)
    assert (out - expected).abs().max() < 1e-5


def decode(layer, query):
    if layer.method == "spark":
        return reference.sparse_decode_attention(query, *layer.span_key_parts, layer.span_values, layer.span_mask,
                                                 layer.keys, layer.values, layer.mask, DIM ** -0.5)
    parts = layer.span_key_parts
    if layer.method == "think":
        parts = (parts[0], *reference.think_basis(parts[1], DIM))
    return reference.decode_attention(query, *parts, layer.span_values, layer.span_mask,
                                      layer.keys, layer.values, layer.mask, DIM ** -0.5)


def plain_attention(query, keys, values, valid):
    """fp64 softmax attention of ``query`` ``[B, Hq, d]`` over every real token."""
    q = query.double().view(query.shape[0], KV_HEADS, GROUP, DIM)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.double()) * DIM ** -0.5
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    out = torch.einsum("bhgs,bhsd->bhgd", logits.softmax(-1), values.double())
    return out.reshape(query.shape[0], KV_HEADS * GROUP, -1).float()


def test_keeping_the_sink_exact_is_what_makes_rotatek_accurate():
    # span Keys near a rank-4 subspace; the first token's Key lies off it, along the queries, and
    # takes most of the attention (as measured sinks do). Compressed with the others (no rule), a
    # rank-4 basis cannot see one token's direction: its logit is lost and the output moves.
    gen = torch.Generator().manual_seed(3)
    length, rank = 120, 4
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen)).Q  # [d, d] orthonormal
    subspace, off = basis[:, :rank], basis[:, rank]  # [d, r], [d]
    keys = (3 * torch.randn(1, KV_HEADS, length, rank, generator=gen)) @ subspace.T
    keys += 0.05 * torch.randn(keys.shape, generator=gen)
    keys[:, :, 0] = 8 * off
    queries = torch.randn(1, KV_HEADS * GROUP, WINDOW + 1, DIM, generator=gen) + 3 * off
    query, queries = queries[:, :, -1], queries[:, :, :-1]  # a later query, like the window's
    values = torch.randn(1, KV_HEADS, length, DIM, generator=gen)
    valid = torch.ones(1, length, dtype=torch.bool)
    span = valid.clone()
    span[:, -WINDOW:] = False
    assert tiers.window_share(queries, keys, DIM ** -0.5, span)[0, :, 0].min() > 0.3  # a sink

    expected = plain_attention(query, keys, values, valid)
    with_rule = decode(compress(keys, values, queries, span, valid, key_channels=rank), query)
    head = slice(0, length - WINDOW)
    squeezed = reference.rotatek_compress(keys[:, :, head], rank, None, queries)  # token 0 compressed too
    without_rule = reference.decode_attention(
        query, *squeezed, values[:, :, head], span[:, head], keys[:, :, -WINDOW:], values[:, :, -WINDOW:],
        valid[:, -WINDOW:], DIM ** -0.5)
    error_with = ((with_rule - expected).norm() / expected.norm()).item()
    error_without = ((without_rule - expected).norm() / expected.norm()).item()
    assert error_with < 0.2 * error_without, (error_with, error_without)
