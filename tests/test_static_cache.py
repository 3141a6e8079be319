"""``generate(..., cache_implementation="static")`` on a compressed cache (CPU, tiny models).

The static-shape path: the compressed span and a fixed-capacity rest written in place, one decode
graph for every step, HF's full-length buffers no longer allocated. Graph tests capture the real
graphs of a tiny Llama (vLLM ``TestBackend`` idea) and toy graphs for the negative cases.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import transformers
from transformers import StaticCache

import rotatek_compile
from rotatek_compile import RotateKBackend, RotateKConfig
from rotatek_compile.hf_compat import cache_kwargs, output_cache
from rotatek_compile.passes.rewrite import state_inputs
from rotatek_compile.passes.static_cache import find_static_sites, rewrite_static_decode, rewrite_static_prefill
from rotatek_compile.state import attached
from rotatek_compile.static_cache import StaticCompressedLayer
from rotatek_compile.tiers import SINK_LIMIT
from tests.test_generate import HEAD_DIM, LAYERS, generate, max_logit_error, padded_prompt, tiny_llama
from tests.test_passes import prefill_calls, trace
from tests.tiny_models import BY_NAME, DECODER, image_token_counts

SDPA = torch._C._nn.scaled_dot_product_attention
DECODE_OP = torch.ops.rotatek.decode_attention.default
STEPS = 16


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def static(model, inputs, steps: int = STEPS, **kwargs):
    return generate(model, inputs, steps=steps, cache_implementation="static", **kwargs)


class _GraphsPerStep:
    """A stopping criterion that records Dynamo's ``unique_graphs`` after the prefill and each step."""

    def __init__(self):
        self.unique_graphs: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.unique_graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_buffers_are_stand_ins(cache) -> bool:
    """HF's own Key/Value tensors hold one element each (the state lives elsewhere)."""
    return all(layer.keys.untyped_storage().nbytes() == layer.keys.element_size()
               and layer.values.untyped_storage().nbytes() == layer.values.element_size()
               for layer in cache.layers)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])  # boolean / additive masks
def test_full_rank_static_matches_uncompiled_model(attn_implementation):
    # batch 2, row 1 left-padded by 7; 16 steps: tokens identical, logits within fp32 rounding,
    # one prefill and one decode graph for every step
    from transformers import StoppingCriteriaList

    model, inputs = tiny_llama(attn_implementation), padded_prompt()
    exact = static(model, inputs)
    backend = RotateKBackend(RotateKConfig(key_channels=HEAD_DIM), inner="eager")
    model.compile(backend=backend)
    counter = _GraphsPerStep()
    compressed = static(model, inputs, stopping_criteria=StoppingCriteriaList([counter]))
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4
    assert [report.phase for report in backend.reports] == ["prefill", "decode"]
    assert all(len(report.rewritten) == LAYERS for report in backend.reports)
    # after the prefill, then after each decode step: the decode graph comes once and serves every step
    assert counter.unique_graphs == [1] + [2] * (STEPS - 1)
    cache = output_cache(compressed)
    assert isinstance(cache, StaticCache) and hf_buffers_are_stand_ins(cache)
    assert all(isinstance(attached(layer.keys), StaticCompressedLayer) for layer in cache.layers)


def test_vlm_image_span_full_rank_static():
    # LLaVA, batch 2, image at a different position in each row: the span is the image tokens
    tiny = BY_NAME["llava"]
    model = tiny.build()
    inputs = tiny.inputs(model, 2)
    exact = static(model, inputs, steps=8)
    model.compile(backend=RotateKBackend(RotateKConfig(key_channels=tiny.head_dim), inner="eager"))
    compressed = static(model, inputs, steps=8)
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4
    for layer in output_cache(compressed).layers:
        state = attached(layer.keys)
        assert torch.equal(state.span_mask.sum(-1), image_token_counts(inputs))


def test_pruned_static_cache_holds_fewer_key_bytes():
    model, inputs = tiny_llama(), padded_prompt()
    steps, rank = 4, HEAD_DIM // 4
    exact = static(model, inputs, steps=steps)
    model.compile(backend=rotatek_compile.backend(key_channels=rank, inner="eager"))
    compressed = static(model, inputs, steps=steps)
    assert all(torch.isfinite(x).all() for x in compressed.logits)
    cache = output_cache(compressed)
    assert hf_buffers_are_stand_ins(cache)
    prompt, capacity = inputs["input_ids"].shape[1], cache.layers[0].max_cache_len
    for layer in cache.layers:
        state = attached(layer.keys)
        batch, heads, span, _ = state.span_key_parts[0].shape
        assert state.span_key_bytes == batch * heads * span * rank * 4  # r of d channels, fp32
        # the rest: the 32 tokens after the span and the span's attention sinks (as many in each
        # row: rotatek_compile.tiers), then room for every later position
        sinks = state.split.exact // batch
        assert 1 <= sinks <= SINK_LIMIT and state.split.exact == sinks * batch
        assert state.capacity == 32 + sinks + (capacity - prompt)
        assert int(state.rest_offset) == prompt - 32 - sinks
        assert torch.equal(state.mask.sum(-1), torch.full((batch,), 32 + sinks + steps - 1))  # last token not yet written
    before, after = rotatek_compile.cache_bytes(output_cache(exact)), rotatek_compile.cache_bytes(cache)
    assert after.compressed_layers == LAYERS and after.keys < before.keys


def test_static_state_dies_with_the_cache():
    model, inputs = tiny_llama(), padded_prompt(batch=1)
    model.compile(backend=rotatek_compile.backend(key_channels=4, inner="eager"))
    out = static(model, inputs, steps=3)
    gc.collect()
    assert sum(isinstance(o, StaticCompressedLayer) for o in gc.get_objects()) == LAYERS
    del out
    gc.collect()
    assert sum(isinstance(o, StaticCompressedLayer) for o in gc.get_objects()) == 0


def test_requests_do_not_keep_their_compressed_caches():
    """A request's compressed cache is freed by reference counting when the request ends, not by
    Python's cyclic collector (which runs rarely: GPU memory ran out across requests)."""
    model = tiny_llama()
    model.compile(backend=rotatek_compile.backend(key_channels=4, inner="eager"))

    def request(n):
        cache = StaticCache(config=model.config, max_cache_len=64)
        token = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            for _ in range(3):
                out = model(input_ids=token, **cache_kwargs(cache), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)

    def live():
        return sum(type(o) is StaticCompressedLayer for o in gc.get_objects())

    request(44)
    gc.collect()
    gc.disable()
    try:
        counts = []
        for n in (40, 36, 50):
            request(n)
            counts.append(live())
    finally:
        gc.enable()
    assert counts[-1] == counts[0] <= LAYERS, counts


def test_requests_of_other_lengths_reuse_the_decode_graph():
    # unpadded prompts: HF's SDPA prefill reads the first T positions causally (no mask); the
    # second length makes the prefill graph symbolic in T. generate() keeps the cache length (the
    # longest so far), so the one decode graph serves the shorter request too, on its own state.
    model = tiny_llama()
    prompts = [{"input_ids": torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))}
               for n in (44, 40, 36)]
    exact = [static(model, prompt, steps=4) for prompt in prompts]
    model.compile(backend=rotatek_compile.backend(key_channels=HEAD_DIM, inner="eager"))
    compressed = [static(model, prompt, steps=4) for prompt in prompts]
    for e, c in zip(exact, compressed):
        assert torch.equal(e.sequences, c.sequences) and max_logit_error(e, c) < 1e-4
        assert all(isinstance(attached(layer.keys), StaticCompressedLayer) for layer in output_cache(c).layers)
    states = [attached(output_cache(c).layers[0].keys) for c in compressed]
    assert [state.split.span for state in states] == [12, 8, 4]  # each prompt minus its last 32 tokens
    # compressed: that span less its attention sinks (kept exact), in at least MIN_SEGMENT slots
    assert all(state.span_tokens == max(state.split.span - state.split.exact, 2) for state in states)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # prefill, decode, symbolic prefill


def _prefill_and_step(model, length: int, capacity: int):
    """A prefill of ``length`` tokens on a fresh ``StaticCache`` of ``capacity`` positions, then one
    decode step: both logits and the cache."""
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        prefill = model(input_ids=ids, **cache_kwargs(cache), use_cache=True).logits
        step = model(input_ids=prefill[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True).logits
    return prefill, step, cache


def test_requests_with_growing_cache_lengths_compress_every_layer():
    # a longer cache than before makes each layer's buffer length a symbol of its own: unequal
    # symbols once left every layer but the first exact, as if sliding-window layers
    model = tiny_llama()
    requests = [(40, 48), (44, 52), (48, 64)]  # (prompt, cache positions)
    exact = [_prefill_and_step(model, *request) for request in requests]
    model.compile(backend=rotatek_compile.backend(key_channels=HEAD_DIM, inner="eager"))
    for (prefill, step, _), request in zip(exact, requests):
        got_prefill, got_step, cache = _prefill_and_step(model, *request)
        assert torch.allclose(prefill, got_prefill, atol=1e-5) and torch.allclose(step, got_step, atol=1e-4)
        assert all(isinstance(attached(layer.keys), StaticCompressedLayer) for layer in cache.layers), request


def test_a_sliding_window_buffer_found_shorter_at_run_time_stays_exact(caplog):
    # Gemma 3 sizes a sliding layer's buffer min(window, cache length): under the window both lengths
    # are symbols of the same graph, so the graph cannot tell them apart; the prefill keeps exact
    # the layer whose buffer is shorter (here the third request: 54 < 64)
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                         sliding_window=54, query_pre_attn_scalar=16, **DECODER)
    model = transformers.Gemma3ForCausalLM(text).eval()
    requests = [(40, 48), (44, 52), (48, 64)]
    exact = [_prefill_and_step(model, *request) for request in requests]
    model.compile(backend=rotatek_compile.backend(key_channels=DECODER["head_dim"], inner="eager"))
    kinds = []
    with caplog.at_level(logging.WARNING, logger="rotatek_compile"):
        for (prefill, step, _), request in zip(exact, requests):
            got_prefill, got_step, cache = _prefill_and_step(model, *request)
            assert torch.allclose(prefill, got_prefill, atol=1e-5) and torch.allclose(step, got_step, atol=1e-4)
            kinds.append([type(attached(layer.keys)).__name__ for layer in cache.layers])
    assert kinds[1:] == [["StaticCompressedLayer"] * 2, ["NoneType", "StaticCompressedLayer"]], kinds
    assert not [r for r in caplog.records if "compression is off" in r.getMessage()]  # nothing compressible is off


def test_preallocated_cache_is_emptied_in_place():
    # a StaticCache allocated before the first call (``early_initialization``, as chunked prefill
    # does): its buffers are graph inputs; after the prefill they are the same tensor objects,
    # holding one element each, and decoding on them matches the uncompiled model at r = d
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))

    def run():
        cache = StaticCache(config=model.config, max_cache_len=48)
        cache.early_initialization(batch_size=2, num_heads=2, head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
        buffers = [(layer.keys, layer.values) for layer in cache.layers]
        logits, token = [], ids
        with torch.no_grad():
            for _ in range(5):
                out = model(input_ids=token, **cache_kwargs(cache), use_cache=True)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits), cache, buffers

    exact, _, _ = run()
    model.compile(backend=rotatek_compile.backend(key_channels=HEAD_DIM, inner="eager"))
    compressed, cache, buffers = run()
    assert (compressed - exact).abs().max().item() < 1e-4
    assert all(layer.keys is keys and layer.values is values for layer, (keys, values) in zip(cache.layers, buffers))
    assert hf_buffers_are_stand_ins(cache)
    assert all(isinstance(attached(layer.keys), StaticCompressedLayer) for layer in cache.layers)


def test_chunk_on_a_compressed_static_cache_is_refused():
    # a second prompt turn of 3 tokens at once: the static decode graph serves one token per call
    model = tiny_llama()
    model.compile(backend=rotatek_compile.backend(key_channels=4, inner="eager"))
    ids = torch.randint(0, 128, (1, 44), generator=torch.Generator().manual_seed(3))
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(input_ids=ids[:, :40], **cache_kwargs(cache), use_cache=True)
        assert all(isinstance(attached(layer.keys), StaticCompressedLayer) for layer in cache.layers)
        with pytest.raises(Exception, match="several new tokens at once on a compressed StaticCache"):
            model(input_ids=ids[:, 40:43], **cache_kwargs(cache), use_cache=True)


@pytest.mark.slow
def test_full_rank_static_under_inductor():
    model, inputs = tiny_llama(), padded_prompt()
    exact = static(model, inputs, steps=4)
    model.compile(backend=rotatek_compile.backend(key_channels=HEAD_DIM))
    compressed = static(model, inputs, steps=4)
    assert torch.equal(exact.sequences, compressed.sequences)
    assert max_logit_error(exact, compressed) < 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_mode_reaches_the_backend_through_options():
    # torch.compile refuses mode= with options=: the options carry it
    assert rotatek_compile.backend(key_channels=4, mode="reduce-overhead").mode == "reduce-overhead"
    with pytest.raises(ValueError, match="rotatek option mode='fast' is invalid"):
        rotatek_compile.backend(key_channels=4, mode="fast")


# ---------------------------------------------------------------------------------------------
# Graphs


class _Recording(RotateKBackend):
    """The rotatek backend (eager inner), keeping each graph and its example inputs."""

    def __init__(self, **options):
        super().__init__(RotateKConfig(**options), inner="eager")
        self.graphs: list[tuple[fx.GraphModule, list]] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        return super().__call__(gm, example_inputs)


@pytest.fixture(scope="module")
def static_graphs():
    torch._dynamo.reset()
    model, recorder = tiny_llama(), _Recording(key_channels=4)
    model.compile(backend=recorder)
    static(model, padded_prompt(), steps=3)
    torch._dynamo.reset()
    return recorder.graphs


def _count(graph: fx.Graph, target) -> int:
    return sum(1 for n in graph.nodes if n.target == target and n.op in ("call_function", "call_method"))


def _compressed_inputs(example_inputs) -> set[int]:
    return {i for i, x in enumerate(example_inputs) if attached(x) is not None}


def test_static_prefill_keeps_attention_and_compresses_each_site(static_graphs):
    (gm, _), _ = static_graphs
    plan = rewrite_static_prefill(gm, query_window=32)
    graph = plan.module.graph
    assert plan.phase == "prefill" and len(plan.sites) == LAYERS
    # the static buffers' boolean mask: SDPA → prefill_attention (flash when the mask is causal)
    assert _count(gm.graph, SDPA) == LAYERS
    assert _count(graph, SDPA) == 0 and len(prefill_calls(graph)) == LAYERS
    # the mask is built inside the op, only if not causal (its computation reads the cache length,
    # which the graph also adds to a counter in place: a read, not a write of what the mask reads)
    assert all(call.target is torch.ops.rotatek.prefill_attention_lazy_mask.default for call in prefill_calls(graph))
    assert _count(graph, "index_copy_") == _count(gm.graph, "index_copy_") == 2 * LAYERS
    # HF creates its buffers inside the prefill graph (lazy initialisation): they were outputs, and
    # each site's compression, which reads them after its attention, now takes their place
    (output,) = graph.find_nodes(op="output")
    calls = [n for n in graph.nodes if n.target is torch.ops.rotatek.compress_site.default]
    assert len(calls) == LAYERS and len(output.args[0]) == plan.num_outputs
    assert all(slot.keys_output >= 0 and slot.past_keys_input == -1 for slot in plan.sites)
    writes = [n for n in graph.nodes if n.target == "index_copy_"]  # keys, values of each layer
    for slot, call, (keys, values) in zip(plan.sites, calls, zip(writes[0::2], writes[1::2])):
        assert output.args[0][slot.keys_output] is call and output.args[0][slot.values_output] is call
        assert call.args[:2] == (keys.args[0], values.args[0])  # HF's buffers, written in place
    # the first site also reads the write positions (is the cache empty? where does the prompt end?)
    assert calls[0].args[4] == [writes[0].args[2]] and all(call.args[4] == [] for call in calls[1:])


def test_static_decode_writes_the_state_in_place(static_graphs):
    _, (gm, example_inputs) = static_graphs
    compressed = _compressed_inputs(example_inputs)
    assert len(compressed) == LAYERS
    before = gm.graph
    assert _count(before, SDPA) == LAYERS and _count(before, "index_copy_") == 2 * LAYERS
    plan = rewrite_static_decode(gm, "rotatek", "auto", compressed)
    graph = plan.module.graph
    assert _count(graph, SDPA) == 0 and _count(graph, DECODE_OP) == LAYERS
    writes = [n for n in graph.nodes if n.target == "index_copy_"]
    # Keys, Values and the validity mask of each layer's rest, into the new inputs only
    assert len(writes) == 3 * LAYERS
    assert all(w.args[0].op == "placeholder" and w.args[0].name.startswith("rotatek_") for w in writes)
    # HF's buffers (stand-ins now) are neither read nor written; its position counter still advances
    placeholders = list(graph.find_nodes(op="placeholder"))
    for slot in plan.sites:
        assert not placeholders[slot.past_keys_input].users and not placeholders[slot.past_values_input].users
    assert _count(graph, "add_") == _count(before, "add_") == LAYERS
    # the state inputs keep their address across calls (CUDA graphs replay them in place), and so
    # does what HF mutates; Inductor reads that off Dynamo's metadata, which the copy keeps
    added = placeholders[len(before.find_nodes(op="placeholder")):]
    assert len(added) == LAYERS * (len(state_inputs("rotatek")) + 1)
    assert all(n.meta["tensor_dict"]["_dynamo_static_input_type"] for n in added)
    counters = [n for n in placeholders if n.name.endswith("cumulative_length")]
    assert len(counters) == LAYERS and all(n.meta["tensor_dict"]["_dynamo_static_input_type"] for n in counters)
    assert plan.module.meta["dynamo_compile_id"] == gm.meta["dynamo_compile_id"]
    assert [n._dynamo_source for n in placeholders[:len(before.find_nodes(op="placeholder"))]] == [
        n._dynamo_source for n in before.find_nodes(op="placeholder")]


def test_static_decode_needs_a_compressed_cache(static_graphs):
    _, (gm, example_inputs) = static_graphs
    assert rewrite_static_decode(gm, "rotatek", "auto", compressed=set()) is None
    one = {min(_compressed_inputs(example_inputs))}
    plan = rewrite_static_decode(gm, "rotatek", "auto", compressed=one)
    assert _count(plan.module.graph, DECODE_OP) == 1 and _count(plan.module.graph, SDPA) == LAYERS - 1
    assert [s.reason for s in plan.skipped] == ["its cache was not filled by a rotatek-compiled prefill"]


def _static_layer(q, cache_k, cache_v, k, v, position, mask):
    cache_k.index_copy_(2, position, k)
    cache_v.index_copy_(2, position, v)
    return F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)


def _toy_inputs(length: int = 8):
    q = torch.randn(1, 2, 1, 16)
    return (q, torch.zeros(1, 2, length, 16), torch.zeros(1, 2, length, 16), q, q, torch.tensor([3]),
            torch.ones(1, 1, 1, length, dtype=torch.bool))


def test_static_toy_layer_is_matched():
    (site,), skipped = find_static_sites(trace(_static_layer, *_toy_inputs()).graph)
    assert not skipped and site.new_tokens == 1 and site.capacity == 8 and site.positions.op == "placeholder"


@pytest.mark.parametrize("variant, reason", [
    ("read elsewhere", "read elsewhere"),  # the buffer also feeds another op
    ("slice", "reads part"),  # attention over a slice of the buffer: not the cache as written
    ("dim 1", None),  # a write along the head dimension is not a cache update
    ("sliding", "sliding-window"),  # a shorter buffer than the cache's: HF's sliding-window layer
])
def test_static_patterns_left_alone(variant, reason):
    def read_elsewhere(q, cache_k, cache_v, k, v, position, mask):
        return _static_layer(q, cache_k, cache_v, k, v, position, mask), cache_k.sum()

    def sliced(q, cache_k, cache_v, k, v, position, mask):
        cache_k.index_copy_(2, position, k)
        cache_v.index_copy_(2, position, v)
        return F.scaled_dot_product_attention(q, cache_k[:, :, :4], cache_v[:, :, :4], attn_mask=mask[..., :4])

    def head_dim_write(q, cache_k, cache_v, k, v, position, mask):
        cache_k.index_copy_(1, position, k[:, :1].expand(1, 1, 8, 16))
        cache_v.index_copy_(1, position, v[:, :1].expand(1, 1, 8, 16))
        return F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)

    def two_layers(q, cache_k, cache_v, k, v, position, mask, short_k, short_v):
        return _static_layer(q, cache_k, cache_v, k, v, position, mask) + _static_layer(
            q, short_k, short_v, k, v, position, mask[..., :4])

    inputs = _toy_inputs()
    if variant == "dim 1":
        inputs = inputs[:5] + (torch.tensor([1]),) + inputs[6:]
    if variant == "sliding":
        inputs = inputs + (torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))
    fn = {"read elsewhere": read_elsewhere, "slice": sliced, "dim 1": head_dim_write, "sliding": two_layers}[variant]
    sites, skipped = find_static_sites(trace(fn, *inputs).graph)
    if variant == "sliding":
        assert len(sites) == 1 and sites[0].capacity == 8
    else:
        assert not sites
    assert [reason in s.reason for s in skipped] == ([True] if reason else [])
