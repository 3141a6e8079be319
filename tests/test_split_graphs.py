"""Prefills and decode steps that Dynamo splits into several graphs.

- The image span crosses graphs left unchanged (DeepStack's injection, a MoE block between two
  layers' attention graphs): their ``[B, S, ...]`` outputs carry the span of a tagged input.
- A decode mask built in another graph is checked to mask padding only; one that hides other
  tokens (a sparse-attention selection) raises instead of being ignored.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rotatek_compile.backend import _SPAN_TAG, RotateKCacheError, _carrying_span, _check_padding_only
from rotatek_compile.config import RotateKConfig
from rotatek_compile.state import compress_layer

B, H, HQ, S, D = 2, 2, 4, 80, 16


def test_a_graph_left_unchanged_carries_the_span_on():
    hidden = torch.randn(B, S, 8)
    span = torch.zeros(B, S, dtype=torch.bool)
    span[:, 3:9] = True
    setattr(hidden, _SPAN_TAG, span)
    weight = torch.nn.Parameter(torch.randn(8, 8))

    def graph(hidden_states, w):  # e.g. DeepStack: hidden + features, a fresh tensor
        return (hidden_states @ w, hidden_states.sum(-1, keepdim=True).expand(B, S, 3), torch.ones(3))

    run = _carrying_span(graph, [hidden, weight])
    outputs = run(hidden, weight)
    assert getattr(outputs[0], _SPAN_TAG) is span and getattr(outputs[1], _SPAN_TAG) is span
    assert not hasattr(outputs[2], _SPAN_TAG)  # not [B, S, ...]
    untagged = run(torch.randn(B, S, 8), weight)  # another request: nothing to carry
    assert not hasattr(untagged[0], _SPAN_TAG)


def _layer(dropped_tokens: int = 0):
    """A compressed layer of a left-padded batch: row 1 has 4 padding tokens."""
    torch.manual_seed(0)
    keys, values = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    queries = torch.randn(B, HQ, 8, D)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :4] = False
    span = valid.clone()
    span[:, -8:] = False
    keep = 1.0 - dropped_tokens / 64 if dropped_tokens else 1.0
    config = RotateKConfig(query_window=8, span="prompt", key_channels=D // 4, token_keep=keep)
    layer = compress_layer(keys, values, queries, span, valid, config, D ** -0.5)
    return dataclasses.replace(layer, dropped=tuple((valid.sum(1) - layer.held_tokens()).tolist())), valid


@pytest.mark.parametrize("dropped_tokens", [0, 8])
def test_decode_mask_with_padding_only_passes(dropped_tokens):
    layer, valid = _layer(dropped_tokens)
    assert (sum(layer.dropped) > 0) == bool(dropped_tokens)  # token pruning drops some
    mask = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)[:, None, None, :]  # [B, 1, 1, S + 1]
    _check_padding_only([(mask, layer, "model.layers.0.self_attn")])
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    _check_padding_only([(additive, layer, "model.layers.0.self_attn"), (mask, layer, "model.layers.1.self_attn")])


def test_decode_mask_hiding_real_tokens_raises():
    layer, valid = _layer()
    selection = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)
    selection[0, 5] = False  # a real token the mask hides: a sparse-attention selection
    padding_only = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
    with pytest.raises(RotateKCacheError, match="mask of model.layers.1.self_attn hides tokens that are not padding"):
        _check_padding_only([(padding_only, layer, "model.layers.0.self_attn"),
                             (selection[:, None, None, :], layer, "model.layers.1.self_attn")])
