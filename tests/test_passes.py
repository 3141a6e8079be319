"""The graph after each pass: op counts, and the patterns the pass must leave alone.

Graphs are captured from a tiny Llama under ``generate()`` by a recording backend (the vLLM
``TestBackend`` idea), then rewritten directly.
"""

from __future__ import annotations

import copy
import operator
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from rotatek_compile.hf_compat import cache_kwargs, output_cache
from rotatek_compile.passes.find_attention import AttentionSite, SkippedSite, find_attention_sites
from rotatek_compile.passes.rewrite import STATE_OUTPUTS, rewrite_decode, rewrite_prefill, state_inputs
from tests.test_generate import LAYERS, padded_prompt, tiny_llama
from tests.tiny_models import BY_NAME

SDPA = torch._C._nn.scaled_dot_product_attention
DECODE_OP = torch.ops.rotatek.decode_attention.default
SPARSE_DECODE_OP = torch.ops.rotatek.sparse_decode_attention.default
LAZY_MASK_OP = torch.ops.rotatek.prefill_attention_lazy_mask.default
PREFILL_OP = torch.ops.rotatek.prefill_attention.default
COMPRESS_OP = torch.ops.rotatek.compress_site.default


class RecordingBackend:
    """Keeps every graph Dynamo produces and runs it unchanged."""

    def __init__(self):
        self.graphs: list[tuple[fx.GraphModule, list]] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        return gm.forward


def capture(attn_implementation="sdpa", **generate_kwargs):
    torch._dynamo.reset()
    model, recorder = tiny_llama(attn_implementation), RecordingBackend()
    model.compile(backend=recorder)
    with torch.no_grad():
        model.generate(**padded_prompt(), max_new_tokens=3, do_sample=False, **generate_kwargs)
    torch._dynamo.reset()
    return recorder.graphs


def count(graph: fx.Graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is target)


def prefill_calls(graph: fx.Graph) -> list[fx.Node]:
    """The prefill attention ops, with the mask as an input or built inside."""
    return [n for n in graph.nodes if n.target in (PREFILL_OP, LAZY_MASK_OP)]


def compress_calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.target is COMPRESS_OP]


def mask_read(call: fx.Node):
    """What a prefill op reads for its mask: the mask node, or (builder, its inputs)."""
    return call.args[3] if call.target is PREFILL_OP else (call.args[6], tuple(call.args[7]), tuple(call.args[8]))


def grouped_heads(call: fx.Node) -> bool:
    return call.args[6] if call.target is PREFILL_OP else call.args[5]


def past_key_inputs(gm: fx.GraphModule) -> set[int]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return {i for i, n in enumerate(placeholders) if n.name.endswith("_keys") and _is_cache_input(n.name)}


def _is_cache_input(name: str) -> bool:
    """HF's cache argument: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24."""
    return "past_key_values" in name or "_kwargs_cache_" in name


@pytest.fixture(scope="module")
def sdpa_graphs():
    return capture("sdpa")


@pytest.fixture(scope="module")
def eager_graphs():
    return capture("eager")


def test_detector_finds_every_layer(sdpa_graphs):
    for gm, _ in sdpa_graphs:
        matches = find_attention_sites(gm.graph)
        assert len(matches) == LAYERS
        assert all(isinstance(m, AttentionSite) for m in matches)
        assert [m.layer for m in matches] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
        assert all(m.rope and m.kind == "sdpa" and m.gqa == "repeat_kv" for m in matches)  # padded: bool mask + repeat_kv
        assert all(m.scale == pytest.approx(16 ** -0.5) for m in matches)
    phases = [find_attention_sites(gm.graph)[0].is_prefill for gm, _ in sdpa_graphs]
    assert phases == [True, False, False]


def test_prefill_rewrite_keeps_attention_and_compresses_each_site(sdpa_graphs):
    gm, _ = sdpa_graphs[0]
    plan = rewrite_prefill(gm, query_window=32)
    assert plan.phase == "prefill" and len(plan.sites) == LAYERS
    # the padded prompt's boolean mask: SDPA → prefill_attention, one causal check for all layers
    assert count(gm.graph, SDPA) == LAYERS and not prefill_calls(gm.graph)
    assert count(plan.module.graph, SDPA) == 0 and len(prefill_calls(plan.module.graph)) == LAYERS
    assert count(plan.module.graph, torch.amax) == 1
    # repeat_kv's [B, Hq, S, d] copies are not read: the op groups the cache's own heads
    for attention in prefill_calls(plan.module.graph):
        assert attention.args[1].target is torch.cat and attention.args[2].target is torch.cat
        assert grouped_heads(attention) is True
    # one compression per site, on the Keys and Values the attention read; nothing is added to the
    # outputs, and the full Keys and Values are no longer among them
    (output,) = plan.module.graph.find_nodes(op="output")
    compressions = compress_calls(plan.module.graph)
    assert len(compressions) == LAYERS and len(output.args[0]) == plan.num_outputs
    for site, (slot, attention, call) in enumerate(zip(plan.sites, prefill_calls(plan.module.graph), compressions)):
        keys, values, window, row, spans, index = call.args
        assert (keys, values) == (attention.args[1], attention.args[2]) and index == site
        assert output.args[0][slot.keys_output] is call and output.args[0][slot.values_output] is call
        assert all(user.op != "output" for user in (*keys.users, *values.users))
        assert row.target is torch.ops.rotatek.kept_copy.default and spans == []  # a text prompt: no merge
    assert len({call.args[3] for call in compressions}) == 1  # one copy of the shared mask's last row
    assert rewrite_decode(gm, "rotatek", "auto", compressed=past_key_inputs(gm)) is None


def test_prefill_compresses_each_site_right_after_its_attention(sdpa_graphs):
    """Each site's compression, and the copy of its query window it reads, come right after its
    attention: Inductor frees the layer's whole query [B, Hq, L, d] and full Keys and Values there,
    not when the graph returns (the prefill peak)."""
    gm, _ = sdpa_graphs[0]
    plan = rewrite_prefill(gm, query_window=32)
    nodes = list(plan.module.graph.nodes)
    for attention, call in zip(prefill_calls(plan.module.graph), compress_calls(plan.module.graph)):
        window = call.args[2]
        assert window.target is torch.ops.rotatek.kept_copy.default
        sliced = window.args[0]
        assert nodes.index(attention) < nodes.index(sliced) < nodes.index(window) < nodes.index(call)
        between = nodes[nodes.index(attention):nodes.index(call)]  # no model work: the mask row's copy at most
        assert not [n for n in between if n.target is F.linear or n.target is torch._C._nn.linear]
        query, keys = attention.args[0], attention.args[1]
        assert max(nodes.index(user) for user in query.users) <= nodes.index(window)
        assert max(nodes.index(user) for user in keys.users) == nodes.index(call)


def test_prefill_hands_the_first_site_the_image_span():
    """A VLM's merge mask [B, S, D] reaches the first site's compression as [B, S] (``any`` over
    its last dimension), and no other site's."""
    torch._dynamo.reset()
    llava = BY_NAME["llava"]
    model, recorder = llava.build(), RecordingBackend()
    model.compile(backend=recorder)
    with torch.no_grad():
        model.generate(**llava.inputs(model, 1), max_new_tokens=1, do_sample=False)
    torch._dynamo.reset()
    plans = [plan for plan in (rewrite_prefill(gm, query_window=4) for gm, _ in recorder.graphs) if plan]
    (plan,) = plans
    calls = compress_calls(plan.module.graph)
    (span,) = calls[0].args[4]
    assert span.target is torch.any and all(call.args[4] == [] for call in calls[1:])
    reduced = span
    while reduced.target is torch.any:
        reduced = reduced.args[0]
    assert reduced.meta["example_value"].dtype == torch.bool and reduced.meta["example_value"].dim() == 3


def test_prefill_without_a_mask_keeps_sdpa():
    """An unpadded prompt on transformers that skip the mask: SDPA(is_causal=True) is left as is."""
    torch._dynamo.reset()
    model, recorder = tiny_llama("sdpa"), RecordingBackend()
    model.compile(backend=recorder)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 40)), use_cache=True)
    torch._dynamo.reset()
    gm = recorder.graphs[0][0]
    plan = rewrite_prefill(gm, query_window=8)
    causal = [n for n in gm.graph.nodes if n.target is SDPA and n.kwargs.get("is_causal")]
    masked = [n for n in gm.graph.nodes if n.target is SDPA and n.kwargs.get("attn_mask") is not None]
    assert len(prefill_calls(plan.module.graph)) == len(masked)
    assert count(plan.module.graph, SDPA) == len(causal)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("buffer", [0, 7], ids=["square", "longer_buffer"])
def test_prefill_attention_op_equals_masked_sdpa(padded, buffer):
    """Both branches of rotatek.prefill_attention give the masked SDPA's result, also when the Keys
    are a StaticCache's buffer, ``buffer`` positions longer than the prompt."""
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 24, 16
    size = length + buffer
    query = torch.randn(batch, heads, length, dim)
    keys, values = torch.randn(batch, kv_heads, size, dim), torch.randn(batch, kv_heads, size, dim)
    mask = torch.ones(length, size, dtype=torch.bool).tril().expand(batch, 1, length, size).clone()
    if padded:
        mask[1, :, :, :5] = False  # row 1 left-padded
        mask[1, :, :5, :5] = torch.eye(5, dtype=torch.bool)  # keep padded rows finite
    causal = (mask == (torch.arange(size)[None, :] <= torch.arange(length)[:, None])).all()
    assert bool(causal) is not padded
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                                scale=0.3, enable_gqa=True)
    out = torch.ops.rotatek.prefill_attention(query, keys, values, mask, causal, 0.3, True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_layers_slicing_one_mask_share_it():
    """transformers ≤ 5.23 slice the model's mask per layer (``mask[:, :, :, :S]``): every layer's
    prefill_attention must read one mask node (Inductor then materialises one ``[B, 1, L, S]`` mask,
    not one per layer: 8 × 0.27 GB at 16k tokens on the H200), with one causal check; a slice that
    is not a prefix keeps its own mask."""
    from rotatek_compile.passes.rewrite import use_causal_kernel

    def layers(query, keys, values, mask):
        out = query
        for _ in range(3):
            out = F.scaled_dot_product_attention(out, keys, values, attn_mask=mask[:, :, :, : keys.shape[-2]])
        shifted = mask[:, :, :, 1:]  # not a prefix slice: a different mask
        # not a repeat: a slice of the sequence (the op must read the slice, not its source)
        return F.scaled_dot_product_attention(out, keys[:, :, 1:], values[:, :, 1:], attn_mask=shifted)

    recorder = RecordingBackend()
    torch._dynamo.reset()
    mask = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    args = (torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), mask)
    expected = layers(*args)
    torch.compile(layers, backend=recorder, fullgraph=True)(*args)
    torch._dynamo.reset()
    (gm, example_inputs), = recorder.graphs
    graph = copy.deepcopy(gm.graph)
    attentions = [n for n in graph.nodes if n.target in (SDPA, F.scaled_dot_product_attention)]
    assert len({n.kwargs["attn_mask"] for n in attentions}) == 4  # one slice node per call
    assert use_causal_kernel(graph, attentions) == 4
    calls = prefill_calls(graph)
    assert len({mask_read(n) for n in calls[:3]}) == 1 and mask_read(calls[3]) != mask_read(calls[0])
    assert count(graph, torch.amax) == 2
    assert calls[3].args[1].target is operator.getitem and grouped_heads(calls[3]) is False
    module = fx.GraphModule(gm, graph)
    torch.testing.assert_close(module(*example_inputs)[0], expected)


def _mask_layers(query, keys, values, padding):
    """Four layers reading one mask built in the graph as transformers 5.17 builds it: causal
    (``kv_index <= q_index``) and the ``[B, S]`` padding mask, expanded; a ``[B, 1, L, S]``
    pointwise expression until something materialises it."""
    length = query.shape[-2]
    causal = torch.arange(length)[None, None, None, :] <= torch.arange(length)[None, None, :, None]
    mask = (causal & padding[:, None, None, :]).expand(query.shape[0], -1, length, length)
    out = query
    for _ in range(LAYERS_IN_GRAPH):
        out = F.scaled_dot_product_attention(out, keys, values, attn_mask=mask)
    return out


def _rewritten_mask_layers(layers, padding):
    """``layers``' graph after the prefill mask rewrite, its example inputs, and the eager result."""
    from rotatek_compile.passes.rewrite import use_causal_kernel

    torch._dynamo.reset()
    recorder = RecordingBackend()
    args = (torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), padding)
    torch.compile(layers, backend=recorder, fullgraph=True)(*args)
    torch._dynamo.reset()
    (gm, example_inputs), = recorder.graphs
    graph = copy.deepcopy(gm.graph)
    attentions = [n for n in graph.nodes if n.target in (SDPA, F.scaled_dot_product_attention)]
    assert use_causal_kernel(graph, attentions) == LAYERS_IN_GRAPH
    return fx.GraphModule(gm, graph), example_inputs, layers(*args)


@pytest.mark.parametrize("padded", [False, True])
def test_a_mask_computed_in_the_graph_is_built_only_when_not_causal(padded):
    """As an input of the opaque attention op, Inductor realised such a mask once per layer, all
    copies computed in one kernel at the start of the graph (8 × 0.27 GB at 16k tokens, 8 layers,
    H200); realised once for all layers it still took 4.3 GB at 64k tokens. The op now gets the
    mask's computation (a module cut from the graph) and its inputs, and builds the mask only for
    a prompt that is not causal: Inductor's code allocates no mask-sized buffer."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code

    from rotatek_compile.ops import MASK_BUILDERS

    padding = torch.ones(2, 10, dtype=torch.bool)
    if padded:
        padding[1, :3] = False
    module, example_inputs, expected = _rewritten_mask_layers(_mask_layers, padding)
    calls = [n for n in module.graph.nodes if n.target is LAZY_MASK_OP]
    assert len(calls) == LAYERS_IN_GRAPH and count(module.graph, PREFILL_OP) == 0
    (key,) = {n.args[6] for n in calls}
    assert [n.target for n in calls[0].args[7]] == ["L_padding_"] and key in MASK_BUILDERS
    # the causal check and the returned row each compute the mask expression themselves: shared by
    # two readers, Inductor stored it whole (17 GB at 128k tokens) with no attention reading it
    mask_sized = [n for n in module.graph.nodes if n.op != "placeholder"
                  and getattr(n.meta.get("example_value"), "shape", None) == (2, 1, 10, 10)]
    assert len(mask_sized) >= 2 and all(len(n.users) <= 1 for n in mask_sized)
    result, (code, *_) = run_and_get_code(lambda: compile_fx(module, example_inputs)(*example_inputs))
    torch.testing.assert_close(result[0], expected)
    assert not re.findall(r"empty_strided_cpu\(\(2, 1, 10, 10\)", code)  # no [B, 1, L, S] buffer


def check_lazy_mask_op(padded: bool, device: str = "cpu", dtype=torch.float32, atol: float = 1e-5) -> None:
    """``rotatek.prefill_attention_lazy_mask`` equals masked SDPA and calls its builder only for a
    mask that is not causal (shared with the GPU test)."""
    from rotatek_compile.ops import MASK_BUILDERS

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 24, 16
    query = torch.randn(batch, heads, length, dim, device=device, dtype=dtype)
    keys, values = (torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype) for _ in range(2))
    padding = torch.ones(batch, length, dtype=torch.bool, device=device)
    if padded:
        padding[1, :5] = False
    calls = []

    def build(padding, length):
        calls.append(length)
        position = torch.arange(length, device=padding.device)
        causal = position[None, :] <= position[:, None]
        return (causal[None, None] & padding[:, None, None, :]) | torch.eye(length, dtype=torch.bool,
                                                                              device=padding.device)

    MASK_BUILDERS["test: causal and padding"] = build
    mask = build(padding, length)
    calls.clear()
    flag = (mask == torch.ones(length, length, dtype=torch.bool, device=device).tril()).all()
    expected = F.scaled_dot_product_attention(query, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1),
                                              attn_mask=mask, scale=0.3)
    out = torch.ops.rotatek.prefill_attention_lazy_mask(query, keys, values, flag, 0.3, True,
                                                        "test: causal and padding", [padding], [length])
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-2)
    assert calls == ([length] if padded else [])


@pytest.mark.parametrize("padded", [False, True])
def test_lazy_mask_prefill_builds_the_mask_only_when_not_causal(padded):
    check_lazy_mask_op(padded)


def test_a_mask_reading_what_an_in_place_write_reads_is_still_built_in_the_op():
    """A StaticCache prefill builds its mask from the cache positions that ``index_copy_`` also
    reads (transformers 5.17): a read next to a write elsewhere, not a write of the mask's input."""
    from rotatek_compile.passes.rewrite import use_causal_kernel

    def layer(query, cache_keys, keys, values, positions):
        cache_keys.index_copy_(2, positions, keys)
        mask = torch.arange(cache_keys.shape[2])[None, None, None, :] <= positions[None, None, :, None]
        return F.scaled_dot_product_attention(query, cache_keys, cache_keys, attn_mask=mask)

    args = (torch.randn(1, 2, 6, 8), torch.zeros(1, 2, 6, 8), torch.randn(1, 2, 6, 8), None, torch.arange(6))
    gm = trace(layer, *args)
    graph = copy.deepcopy(gm.graph)
    attentions = [n for n in graph.nodes if n.target in (SDPA, F.scaled_dot_product_attention)]
    assert use_causal_kernel(graph, attentions) == 1
    assert [n.target for n in prefill_calls(graph)] == [LAZY_MASK_OP]


def _mask_written_in_place(query, keys, values, padding):
    length = query.shape[-2]
    mask = torch.arange(length)[None, None, None, :] <= torch.arange(length)[None, None, :, None]
    mask = mask.expand(query.shape[0], 1, length, length).clone()
    mask.logical_and_(padding[:, None, None, :])
    return _attend_in_layers(query, keys, values, mask)


def _mask_from_activations(query, keys, values, padding):
    scores = query @ keys.transpose(-1, -2)  # [B, H, L, S]: what a learned mask would read
    return _attend_in_layers(query, keys, values, (scores[:, :1] > -1e9) & padding[:, None, None, :])


def _attend_in_layers(query, keys, values, mask):
    out = query
    for _ in range(LAYERS_IN_GRAPH):
        out = F.scaled_dot_product_attention(out, keys, values, attn_mask=mask)
    return out


def _mask_under_vmap(query, keys, values, padding):
    """As transformers' ``_vmap_for_bhqkv`` builds some masks: a per-row function under ``vmap``."""
    length = query.shape[-2]
    positions = torch.arange(length)

    def row(keep):  # [S] padding of one row → [L, S]
        return (positions[None, :] <= positions[:, None]) & keep[None, :]

    return _attend_in_layers(query, keys, values, torch.vmap(row)(padding)[:, None])


@pytest.mark.parametrize("layers", [_mask_written_in_place, _mask_from_activations, _mask_under_vmap],
                         ids=["in_place", "activations", "vmap"])
def test_a_mask_the_op_should_not_replay_is_materialised_once(layers):
    """A mask whose computation writes in place (a replay would differ), reads activations (a
    replay would repeat model work) or runs under ``vmap`` (its batch-dim plumbing needs the vmap
    levels set around it: a replay raised functorch's "tensor may have escaped" error) is copied
    once (``rotatek.kept_copy``) for every layer."""
    module, example_inputs, expected = _rewritten_mask_layers(layers, torch.ones(2, 10, dtype=torch.bool))
    calls = [n for n in module.graph.nodes if n.target is PREFILL_OP]
    (mask,) = {n.args[3] for n in calls}
    assert len(calls) == LAYERS_IN_GRAPH and mask.target is torch.ops.rotatek.kept_copy.default
    torch.testing.assert_close(module(*example_inputs)[0], expected)


LAYERS_IN_GRAPH = 4


def test_prefill_attention_output_is_laid_out_for_the_output_projection():
    """[B, Hq, L, dv] in [B, L, Hq, dv] memory order, as the fake says, on every branch."""
    query, keys, values = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    causal_mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    for flag in (True, False):
        out = torch.ops.rotatek.prefill_attention(query, keys, values, causal_mask, torch.tensor(flag), 0.3, True)
        assert out.shape == (2, 4, 6, 8) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("method, op", [("rotatek", DECODE_OP), ("think", DECODE_OP), ("spark", SPARSE_DECODE_OP)])
def test_decode_rewrite_replaces_every_sdpa(sdpa_graphs, method, op):
    for gm, _ in sdpa_graphs[1:]:
        plan = rewrite_decode(gm, method, "auto", compressed=past_key_inputs(gm))
        graph = plan.module.graph
        assert count(gm.graph, SDPA) == LAYERS and count(gm.graph, op) == 0
        assert count(graph, SDPA) == 0 and count(graph, op) == LAYERS
        inputs_added = len(graph.find_nodes(op="placeholder")) - len(gm.graph.find_nodes(op="placeholder"))
        assert inputs_added == LAYERS * len(state_inputs(method))
        (output,) = graph.find_nodes(op="output")
        assert len(output.args[0]) - plan.num_outputs == LAYERS * len(STATE_OUTPUTS)
        # HF's cache outputs are the past stand-ins, returned as they came
        for slot in plan.sites:
            assert output.args[0][slot.keys_output].op == "placeholder"
        # the old cache appends (full-width concatenation of the whole past) are gone
        past = [n for n in graph.find_nodes(op="placeholder") if _is_cache_input(n.name)]
        assert all(user.op == "output" for n in past for user in n.users)


@pytest.fixture(scope="module")
def chunk_graph():
    """The graph of a 5-token chunk appended to a filled cache (a second prompt turn)."""
    torch._dynamo.reset()
    model, recorder = tiny_llama(), RecordingBackend()
    model.compile(backend=recorder)
    ids = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids[:, :40], use_cache=True)
        model(input_ids=ids[:, 40:], **cache_kwargs(output_cache(out)), use_cache=True)
    torch._dynamo.reset()
    (gm, _), = recorder.graphs[1:]
    return gm


def _op_queries(graph: fx.Graph, op) -> list[fx.Node]:
    return [n.args[0] for n in graph.nodes if n.op == "call_function" and n.target is op]


def test_chunk_rewrite_passes_the_whole_query(chunk_graph, sdpa_graphs):
    # T new tokens: the op gets q [B, Hq, T, d] and its output replaces attention's as is
    plan = rewrite_decode(chunk_graph, "rotatek", "auto", compressed=past_key_inputs(chunk_graph))
    graph = plan.module.graph
    assert count(graph, SDPA) == 0 and count(graph, DECODE_OP) == LAYERS
    for query in _op_queries(graph, DECODE_OP):
        assert query.meta["example_value"].shape[2] == 5 and query.target is not torch.select
    # one new token: the op's one-token form, q[:, :, 0] → [B, Hq, d]
    gm, _ = sdpa_graphs[1]
    step = rewrite_decode(gm, "rotatek", "auto", compressed=past_key_inputs(gm)).module.graph
    assert all(query.target is torch.select for query in _op_queries(step, DECODE_OP))


def test_decode_rewrite_of_eager_attention(eager_graphs):
    gm, _ = eager_graphs[1]
    assert count(gm.graph, torch.matmul) == 2 * LAYERS
    plan = rewrite_decode(gm, "rotatek", "auto", compressed=past_key_inputs(gm))
    assert count(plan.module.graph, DECODE_OP) == LAYERS
    assert count(plan.module.graph, torch.matmul) == 0
    assert count(plan.module.graph, F.softmax) == 0


def test_decode_rewrite_needs_a_compressed_cache(sdpa_graphs):
    gm, _ = sdpa_graphs[1]
    assert rewrite_decode(gm, "rotatek", "auto", compressed=set()) is None
    one_layer = {min(past_key_inputs(gm))}
    plan = rewrite_decode(gm, "rotatek", "auto", compressed=one_layer)
    assert count(plan.module.graph, DECODE_OP) == 1 and count(plan.module.graph, SDPA) == LAYERS - 1
    assert [s.reason for s in plan.skipped] == ["its cache was not filled by a rotatek-compiled prefill"]


# One in-place write per family, into ``x`` (a graph input), whose result nothing reads
IN_PLACE = {
    "scatter_": lambda g, x: g.call_method("scatter_", (x, 1, x, x)),  # MoE routing
    "copy_": lambda g, x: g.call_method("copy_", (x, x)),  # linear-attention / conv cache state
    "index_copy_": lambda g, x: g.call_method("index_copy_", (x, 1, x, x)),  # static cache write
    "add_": lambda g, x: g.call_method("add_", (x, 1)),
    "setitem": lambda g, x: g.call_function(operator.setitem, (x, 0, 1)),  # x[i] = y
    "aten.copy_": lambda g, x: g.call_function(torch.ops.aten.copy_.default, (x, x)),
    "out=": lambda g, x: g.call_function(torch.add, (x, 1), {"out": x}),
}


@pytest.mark.parametrize("family", list(IN_PLACE))
def test_decode_rewrite_keeps_in_place_writes(sdpa_graphs, family):
    gm, _ = sdpa_graphs[1]
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = gm.graph
    x = next(iter(graph.find_nodes(op="placeholder")))
    (output,) = graph.find_nodes(op="output")
    with graph.inserting_before(output):
        write = IN_PLACE[family](graph, x)
        dead = graph.call_method("add", (x, 1))  # pure, unused: removed
    plan = rewrite_decode(gm, "rotatek", "auto", compressed=past_key_inputs(gm))
    names = {n.name for n in plan.module.graph.nodes}
    assert count(plan.module.graph, DECODE_OP) == LAYERS
    assert write.name in names and dead.name not in names


def test_returned_attention_weights_block_the_rewrite():
    graphs = capture("eager", output_attentions=True, return_dict_in_generate=True)
    decode_graph = graphs[-1][0]  # the returned weights add a graph; the last one decodes
    matches = find_attention_sites(decode_graph.graph)
    assert len(matches) == LAYERS
    assert all(isinstance(m, SkippedSite) and "reused" in m.reason for m in matches)
    assert rewrite_decode(decode_graph, "rotatek", "auto", compressed=past_key_inputs(decode_graph)) is None


def trace(fn, *inputs) -> fx.GraphModule:
    recorder = RecordingBackend()
    torch._dynamo.reset()
    torch.compile(fn, backend=recorder, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return recorder.graphs[0][0]


def test_attention_without_cache_is_skipped():
    """Vision towers and encoders: no cache append feeds the Keys."""
    q = k = v = torch.randn(1, 2, 8, 16)
    gm = trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    (match,) = find_attention_sites(gm.graph)
    assert isinstance(match, SkippedSite) and "no KV-cache append" in match.reason
    assert rewrite_prefill(gm, 32) is None


def test_sliding_window_cache_is_skipped():
    """The cache keeps a slice of the appended Keys: compressing them would be wrong."""

    def sliding(q, past_k, past_v, k, v):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return out, keys[:, :, -4:], values[:, :, -4:]

    q = torch.randn(1, 2, 1, 16)
    past, new = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 1, 16)
    gm = trace(sliding, q, past, past, new, new)
    (match,) = find_attention_sites(gm.graph)
    assert isinstance(match, SkippedSite) and "sliding-window" in match.reason and not match.compressible


def test_latent_attention_is_named():
    # MLA: the cache keeps a latent; Keys are projected from it after the cache read
    def latent(q, past, new, up):
        cache = torch.cat([past, new], dim=-2)  # [B, 1, S, rank]
        keys = (cache @ up).expand(-1, 2, -1, -1)  # [B, 2, S, d]
        return F.scaled_dot_product_attention(q, keys, keys), cache

    q, past, new, up = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 1, 4), torch.randn(4, 16)
    (match,) = find_attention_sites(trace(latent, q, past, new, up).graph)
    assert isinstance(match, SkippedSite) and "latent attention" in match.reason and match.compressible


def test_attention_scaled_by_division_is_matched():
    def divided(q, past_k, past_v, k, v):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        probs = torch.softmax(torch.matmul(q, keys.transpose(2, 3)) / 4.0, dim=-1, dtype=torch.float32)
        return torch.matmul(probs.to(q.dtype), values), keys, values

    q, past = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    (match,) = find_attention_sites(trace(divided, q, past, past, q, q).graph)
    assert isinstance(match, AttentionSite) and match.kind == "eager" and match.scale == pytest.approx(0.25)


def test_static_cache_in_place_update_is_not_matched():
    def static(q, cache_k, cache_v, k, v, position):
        cache_k.index_copy_(2, position, k)
        cache_v.index_copy_(2, position, v)
        return F.scaled_dot_product_attention(q, cache_k, cache_v)

    q, cache = torch.randn(1, 2, 1, 16), torch.zeros(1, 2, 8, 16)
    gm = trace(static, q, cache.clone(), cache.clone(), q, q, torch.tensor([3]))
    (match,) = find_attention_sites(gm.graph)
    assert isinstance(match, SkippedSite)
    assert sum(1 for n in gm.graph.nodes if n.target in ("index_copy_", torch.Tensor.index_copy_)) == 2


def test_cache_append_that_is_not_returned_is_skipped():
    def no_writeback(q, past_k, past_v, k, v):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        return F.scaled_dot_product_attention(q, keys, values)

    q, past = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    gm = trace(no_writeback, q, past, past, q, q)
    (match,) = find_attention_sites(gm.graph)
    assert isinstance(match, SkippedSite) and "does not return its cache append" in match.reason
    assert match.compressible  # left exact where it could be compressed: the backend warns


def test_sliding_window_cache_is_skipped_as_such():
    def sliding(q, past_k, past_v, k, v):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return out, keys[:, :, -7:], values[:, :, -7:]  # the cache keeps the last window - 1 tokens

    q, past = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    (match,) = find_attention_sites(trace(sliding, q, past, past, q, q).graph)
    assert isinstance(match, SkippedSite) and "sliding-window" in match.reason and not match.compressible


def test_mask_from_learned_weights_is_left_exact():
    # a relative-position bias (or a sparse indexer's block choice) inside the additive mask:
    # the decode op keeps only valid/invalid, so the site must stay exact (and be reported)
    bias_table = torch.nn.Embedding(16, 1)

    def biased(q, past_k, past_v, k, v, distance, valid):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        bias = bias_table(distance)[..., 0]  # [1, 1, L, S] from learned weights
        mask = torch.where(valid, bias, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), keys, values

    def padding_only(q, past_k, past_v, k, v, distance, valid):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        mask = torch.where(valid, 0.0, torch.finfo(q.dtype).min)  # HF's additive padding mask
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), keys, values

    q, past = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    distance = torch.randint(0, 16, (1, 1, 1, 9))
    valid = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    (match,) = find_attention_sites(trace(biased, q, past, past, q, q, distance, valid).graph)
    assert isinstance(match, SkippedSite) and "learned weights" in match.reason and match.compressible
    (match,) = find_attention_sites(trace(padding_only, q, past, past, q, q, distance, valid).graph)
    assert isinstance(match, AttentionSite)


def test_state_space_layers_are_reported_left_exact():
    """A linear-attention / Mamba layer's cache (a recurrent state written back by copy_) is
    reported as left exact and not compressible; other cache inputs are not."""
    from rotatek_compile.passes.find_attention import state_space_layers

    graph = fx.Graph()
    state = graph.placeholder("l_kwargs_cache_layers_0_conv_states_0_")
    keys = graph.placeholder("l_kwargs_cache_layers_1_keys_")
    new = graph.placeholder("l_new_")
    write = graph.call_method("copy_", (state, new))
    write.meta["nn_module_stack"] = {"m": ("L['self'].model.layers[0].linear_attn", object)}
    keys_write = graph.call_method("copy_", (keys, new))
    keys_write.meta["nn_module_stack"] = {"m": ("L['self'].model.layers[1].self_attn", object)}
    graph.output((new,))
    skipped = state_space_layers(graph)
    assert [(s.layer, s.compressible) for s in skipped] == [("model.layers.0.linear_attn", False)]
    assert "fixed-size state" in skipped[0].reason


def test_learned_mask_is_found_through_multi_output_ops():
    """A sparse-attention indexer's mask: weights → scores → topk (a tuple) → indices → mask. The
    walk follows the tuple (a value edge) but not a shape read."""
    from rotatek_compile.passes.find_attention import _learned_inputs

    graph = fx.Graph()
    weight = graph.placeholder("l_self_modules_indexer_parameters_weight_")
    hidden = graph.placeholder("l_hidden_")
    weight.meta["example_value"], hidden.meta["example_value"] = torch.randn(4, 4), torch.randn(6, 4)
    scores = graph.call_function(torch.matmul, (hidden, weight))
    scores.meta["example_value"] = torch.randn(6, 4)
    top = graph.call_method("topk", (scores, 2))
    top.meta["example_value"] = torch.randn(6, 4).topk(2)
    indices = graph.call_function(operator.getitem, (top, 1))
    indices.meta["example_value"] = torch.zeros(6, 2, dtype=torch.long)
    mask = graph.call_function(torch.zeros_like, (scores,), {"dtype": torch.bool})
    mask = graph.call_method("scatter", (mask, 1, indices, True))
    mask.meta["example_value"] = torch.zeros(6, 4, dtype=torch.bool)
    size = graph.call_method("size", (hidden, 0))
    size.meta["example_value"] = 6
    plain = graph.call_function(torch.ones, (size, 4), {"dtype": torch.bool})
    plain.meta["example_value"] = torch.ones(6, 4, dtype=torch.bool)
    graph.output((mask, plain))
    assert _learned_inputs(mask)
    assert not _learned_inputs(plain)  # built from the hidden states' size alone


def test_span_finder_matches_boolean_mask_assignment():
    """``embeds[mask] = features`` (Kosmos-2.5's merge, FX ``operator.setitem``) is an image merge;
    a constant fill under a mask is not."""
    from rotatek_compile.passes.visual_span import find_span_masks

    def merge(embeds, input_ids, features):
        image = input_ids == 7
        embeds[image] = features  # the merge
        embeds[input_ids == 0] = 0.0  # padding zeroed: not a merge
        return embeds * 2

    recorder = RecordingBackend()
    torch._dynamo.reset()
    ids = torch.tensor([[1, 7, 7, 2], [0, 7, 7, 3]])
    torch.compile(merge, backend=recorder, fullgraph=True)(torch.randn(2, 4, 8), ids, torch.randn(4, 8))
    torch._dynamo.reset()
    (gm, _), = recorder.graphs
    masks = find_span_masks(gm.graph)
    assert len(masks) == 1
    (eq,) = [n for n in gm.graph.nodes if n.target in (operator.eq, torch.eq) and n.args[1] == 7]  # by torch version
    assert masks[0] is eq


def test_merged_self_and_cross_attention_is_named():
    """T5Gemma 2's decoder joins its cached Keys with the encoder's before one softmax: reported as
    merged attention (left exact), not as a cache written back some other way."""
    from rotatek_compile.passes.find_attention import sites_and_skips

    def decoder_layer(query, past_keys, past_values, keys, values, encoder_keys, encoder_values):
        cached_keys = torch.cat([past_keys, keys], dim=-2)  # the cache append, returned
        cached_values = torch.cat([past_values, values], dim=-2)
        merged_keys = torch.cat([cached_keys, encoder_keys], dim=-2)
        merged_values = torch.cat([cached_values, encoder_values], dim=-2)
        out = F.scaled_dot_product_attention(query, merged_keys, merged_values)
        return out, cached_keys, cached_values

    recorder = RecordingBackend()
    torch._dynamo.reset()
    args = [torch.randn(1, 2, 1, 8)] + [torch.randn(1, 2, n, 8) for n in (5, 5, 1, 1, 3, 3)]
    torch.compile(decoder_layer, backend=recorder, fullgraph=True)(*args)
    torch._dynamo.reset()
    (gm, _), = recorder.graphs
    sites, skipped = sites_and_skips(gm.graph)
    assert not sites and len(skipped) == 1
    assert skipped[0].reason.startswith("merged attention") and skipped[0].compressible


def test_a_returned_kv_cache_append_nothing_recognised_reads_is_reported():
    """A graph that appends to a KV cache and returns it, read by an attention the pass does not
    match (here: sink logits inside the softmax), reports the append as a layer left exact; a
    graph that only concatenates along another dim reports nothing."""
    from rotatek_compile.passes.find_attention import _UNKNOWN_READER, sites_and_skips

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def sink_attention(q, past, k, v, sinks):
        keys = torch.cat([past, k], dim=-2)  # [B, H, S, d]: the cache append, returned
        logits = torch.cat([q @ keys.transpose(-1, -2), sinks.expand(*q.shape[:3], 1)], dim=-1)
        return keys, torch.softmax(logits, dim=-1)[..., :-1] @ v

    def no_cache(q, past, k, v, sinks):
        return torch.cat([q, k], dim=-1), q @ k.transpose(-1, -2) @ k

    args = (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 8, 8),
            torch.randn(1, 2, 1, 1))
    for fn in (sink_attention, no_cache):
        torch._dynamo.reset()
        torch.compile(fn, backend=capture, fullgraph=True)(*args)
    (sites, skipped), (no_sites, none) = (sites_and_skips(gm.graph) for gm in graphs)
    assert not sites and [s.reason for s in skipped] == [_UNKNOWN_READER] and skipped[0].compressible
    assert not no_sites and not none
