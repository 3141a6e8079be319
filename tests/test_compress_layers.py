"""``compress_layers``: the prefill's layers built with one batched basis solve, equal to building
each layer alone (``compress_layer``). Synthetic layers, as in ``tests/test_sinks.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rotatek_compile.config import RotateKConfig
from rotatek_compile.kernels import reference
from rotatek_compile.state import CompressedLayer, LayerPrefill, compress_layer, compress_layers
from tests.host_reads import HostReads
from tests.test_sinks import DIM, WINDOW, layer_inputs

SCALE = DIM ** -0.5


def prefills(count: int = 3) -> list[LayerPrefill]:
    """``count`` layers of different Keys; the second has an attention sink 7 tokens in."""
    return [LayerPrefill(*layer_inputs(seed=seed, sink=7 if seed == 1 else None), scale=SCALE)
            for seed in range(count)]


def assert_same_layer(batched: CompressedLayer, alone: CompressedLayer) -> None:
    assert batched.split == alone.split
    for name in ("span_values", "span_mask", "keys", "values", "mask"):
        assert torch.equal(getattr(batched, name), getattr(alone, name)), name
    for part, (mine, theirs) in enumerate(zip(batched.span_key_parts, alone.span_key_parts)):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-5, msg=f"span key part {part}")


@pytest.mark.parametrize("solver", ["eigh", "subspace"])
@pytest.mark.parametrize("rank", [4, DIM])
def test_batched_solve_equals_one_layer_at_a_time(solver, rank):
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=rank, solver=solver)
    layers = prefills()
    alone = [compress_layer(p.keys, p.values, p.queries, p.span, p.valid, config, SCALE) for p in layers]
    batched = list(compress_layers(layers, config))
    assert len(batched) == len(alone) == 3
    for mine, theirs in zip(batched, alone):
        assert_same_layer(mine, theirs)


@pytest.mark.parametrize("query_aware", ["auto", True])
def test_layers_of_different_prompt_shapes_are_each_built_as_alone(query_aware, monkeypatch):
    """Layers whose masks differ in shape (length, batch) are grouped by shape for the sinks and the
    solve; a batch without padding slots takes the attention without a mask in the basis choice."""
    masked = []
    judge = reference.basis_attention_error
    monkeypatch.setattr(reference, "basis_attention_error",
                        lambda q, k, v, mask, *a: masked.append(mask is not None) or judge(q, k, v, mask, *a))
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4, query_aware=query_aware)
    shapes = [dict(length=160), dict(length=120, seed=1, sink=7), dict(length=160, seed=2),
              dict(padding=(0, 0), length=96, seed=3), dict(padding=(0, 0), length=96, seed=4, sink=5)]
    layers = [LayerPrefill(*layer_inputs(**shape), scale=SCALE) for shape in shapes]
    alone = [compress_layer(p.keys, p.values, p.queries, p.span, p.valid, config, SCALE) for p in layers]
    batched = list(compress_layers(layers, config))
    for mine, theirs in zip(batched, alone, strict=True):
        assert_same_layer(mine, theirs)
    assert not batched[3].span_mask.logical_not().any()  # no padding slot: the unmasked path
    if query_aware == "auto":  # judged once alone and once batched per layer; padded rows need the mask
        assert masked == [True, True, True, False, False] * 2


@pytest.mark.parametrize("stack_bytes", [1 << 30, 1, None])
def test_layers_are_stacked_as_batch_rows_up_to_a_byte_limit(stack_bytes, monkeypatch):
    """The covariances and the basis choice run once per stack of consecutive layers alike (the
    choice also needs one span width), not once per layer (the sinks' shares stay per layer: their
    fp32 logits are larger than the Keys); with a byte limit
    below two layers' Keys, or none (the CPU's default), every layer runs alone. Either way each
    layer is built as alone."""
    from rotatek_compile import state, tiers

    if stack_bytes is not None:
        monkeypatch.setattr(state, "STACK_BYTES", {"cpu": stack_bytes})
    calls = {"window_share": 0, "span_covariance": 0, "basis_attention_error": 0}
    for module in (tiers, reference):
        for name in calls:
            if hasattr(module, name):
                function = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _f=function, _n=name: calls.update({_n: calls[_n] + 1})
                                    or _f(*a))
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4)
    layers = prefills(5)  # layer 1 has a second sink per row: its span is narrower
    alone = [compress_layer(p.keys, p.values, p.queries, p.span, p.valid, config, SCALE) for p in layers]
    for name in calls:
        calls[name] = 0
    for mine, theirs in zip(compress_layers(layers, config), alone, strict=True):
        assert_same_layer(mine, theirs)
        for tensor in (*mine.span_key_parts, mine.span_values, mine.keys, mine.values):  # no slice of a stack
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    stacked = {"window_share": 5, "span_covariance": 1, "basis_attention_error": 3}  # [0], [1], [2, 3, 4]
    assert calls == (stacked if stack_bytes == 1 << 30 else dict.fromkeys(calls, 5))


@pytest.mark.parametrize("options", [dict(query_aware=False), dict(token_keep=0.5), dict(kv_budget=0.4),
                                     dict(method="think"), dict(method="spark")])
def test_every_method_builds_stacked_layers_as_alone(options, monkeypatch):
    from rotatek_compile import state

    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4, **options)
    alone = list(compress_layers(prefills(4), config))
    monkeypatch.setattr(state, "STACK_BYTES", {"cpu": 1 << 30})
    for mine, theirs in zip(compress_layers(prefills(4), config), alone, strict=True):
        assert_same_layer(mine, theirs)


def test_the_sinks_of_each_layer_are_its_own():
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4)
    batched = list(compress_layers(prefills(), config))
    exact = [layer.split.exact for layer in batched]
    assert exact[1] > exact[0] and exact[1] > exact[2]  # the sink of layer 1 only


def test_one_solve_for_all_layers_where_rotatek_takes_the_whole_span(monkeypatch):
    calls = []
    solve = reference.solve_basis
    monkeypatch.setattr(reference, "solve_basis", lambda cov, *a, **k: calls.append(cov.shape) or solve(cov, *a, **k))
    list(compress_layers(prefills(), RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4)))
    # [bases, layers, B, H, d, d]: query_aware="auto" solves K-only PCA, the query-aware basis, and
    # the query-aware basis of the window's first half (to judge the two)
    assert calls == [torch.Size([3, 3, 3, 2, DIM, DIM])]

    calls.clear()
    list(compress_layers(prefills(), RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4,
                                                   query_aware=True)))
    assert calls == [torch.Size([1, 3, 3, 2, DIM, DIM])]

    calls.clear()  # token pruning chooses tokens per layer before its basis: one solve per layer
    list(compress_layers(prefills(), RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4,
                                                   token_keep=0.5)))
    assert len(calls) == 3

    calls.clear()
    list(compress_layers(prefills(), RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4,
                                                   method="think")))
    assert calls == []


def test_each_layer_is_dropped_from_the_list_before_it_is_yielded():
    layers = prefills()
    results = compress_layers(layers, RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4))
    next(results)
    assert layers[0] is None and all(isinstance(p, LayerPrefill) for p in layers[1:])
    list(results)
    assert layers == [None, None, None]


def test_layers_of_other_shapes_are_solved_alone():
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4)
    layers = prefills(2)
    short = layers[1]
    layers[1] = dataclasses.replace(short, keys=short.keys[:2], values=short.values[:2], queries=short.queries[:2],
                                    span=short.span[:2], valid=short.valid[:2])
    alone = [compress_layer(p.keys, p.values, p.queries, p.span, p.valid, config, SCALE) for p in layers]
    for mine, theirs in zip(compress_layers(layers, config), alone):
        assert_same_layer(mine, theirs)


@pytest.mark.parametrize("solver", ["eigh", "subspace"])
def test_all_layers_are_sized_by_one_host_read(solver):
    """The segments of every layer (span less its sinks, rest) are sized by one read of all layers'
    token counts, and nothing else is read (the subspace solver's breakdowns are handled on the
    device). Before, each layer read the device 8 times, so a GPU idled while the host waited
    before each layer's next launches."""
    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4, solver=solver)
    layers = prefills(5)
    with HostReads() as host:
        built = list(compress_layers(layers, config))
    assert len(built) == 5 and all(isinstance(layer, CompressedLayer) for layer in built)
    assert host.reads == ["tolist"]
