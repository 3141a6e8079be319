"""Compression inside the prefill graph (``rotatek_compile.prefill``): each layer's full Keys and
Values are gone once its compression has run, and layers compressed in groups give the cache of
layers compressed one by one."""

from __future__ import annotations

import threading
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rotatek_compile
from rotatek_compile import ops, prefill
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.state import attached
from tests.host_reads import HostReads
from tests.test_compress_layers import assert_same_layer
from tests.test_generate import padded_prompt

LAYERS = 4


def four_layer_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def generate(options: dict, steps: int = 4, warm_up: bool = False, **kwargs):
    """Greedy generation from a 64-token prompt; ``warm_up``: after one from a 40-token prompt (the
    prefill graph is then compiled again, with symbolic sizes)."""
    model = four_layer_llama()
    model.compile(backend=rotatek_compile.backend(key_channels=8, inner="eager", **options))
    with torch.no_grad():
        for length in [40, 64] if warm_up else [64]:
            out = model.generate(**padded_prompt(length=length), max_new_tokens=steps, do_sample=False,
                                 return_dict_in_generate=True, **kwargs)
    return out


def counting_compressions(monkeypatch) -> list[tuple[str, int]]:
    """Record the steps of each group's compression the prefill makes, in order: ``("count", n)``
    when a group of ``n`` layers is queued, ``("compress", n)`` when it is compressed."""
    calls: list[tuple[str, int]] = []
    count, compress = prefill.count_tokens, prefill.compress_counted

    def counted(layers, config):
        calls.append(("count", len(layers)))
        return count(layers, config)

    def compressed(counts):
        calls.append(("compress", len(counts.layers)))
        return compress(counts)

    monkeypatch.setattr(prefill, "count_tokens", counted)
    monkeypatch.setattr(prefill, "compress_counted", compressed)
    return calls


def one_by_one(groups: list[int]) -> list[tuple[str, int]]:
    """Each group counted and compressed before the next one."""
    return [step for size in groups for step in (("count", size), ("compress", size))]


def pipelined(groups: list[int]) -> list[tuple[str, int]]:
    """Every group counted as it completes, all compressed at the last site."""
    return [("count", size) for size in groups] + [("compress", size) for size in groups]


# a layer's Keys and Values: 2 rows x 2 heads x 64 tokens x 16 channels, fp32, twice: 32 KiB
@pytest.mark.parametrize("held_bytes, pipelined_groups, steps", [
    ({}, 4, one_by_one([1] * LAYERS)),
    ({"cpu": 80_000}, 4, one_by_one([2, 2])),  # 2 groups of copies within the bytes
    ({"cpu": 1 << 40}, 1, pipelined([LAYERS])),
    ({"cpu": 1 << 40}, 2, pipelined([2, 2])),
    ({"cpu": 1 << 40}, 4, pipelined([1] * LAYERS)),
], ids=["alone", "two_groups", "one_group", "pipelined_pairs", "pipelined_layers"])
def test_layers_compressed_in_groups_give_the_cache_of_layers_alone(held_bytes, pipelined_groups, steps,
                                                                     monkeypatch):
    monkeypatch.setattr(prefill, "HELD_BYTES", {})
    alone = generate({})
    monkeypatch.setattr(prefill, "HELD_BYTES", held_bytes)
    monkeypatch.setattr(prefill, "PIPELINED_GROUPS", pipelined_groups)
    calls = counting_compressions(monkeypatch)
    mine = generate({})
    assert calls == steps
    assert torch.equal(mine.sequences, alone.sequences)
    for ours, theirs in zip(output_cache(mine).layers, output_cache(alone).layers):
        assert_same_layer(attached(ours.keys), attached(theirs.keys))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("held_bytes, pipelined_groups", [({}, 4), ({"cpu": 1 << 40}, 1), ({"cpu": 1 << 40}, 2)],
                         ids=["alone", "one_group", "pipelined_pairs"])
def test_each_layers_full_cache_is_freed_once_it_is_compressed(held_bytes, pipelined_groups, cache, monkeypatch):
    """When a layer's compression starts, no earlier layer's full Keys or Values from the graph are
    alive (a DynamicCache's, or the StaticCache buffers HF creates in the graph): they are no longer
    its outputs, and the run holds none of them (one by one, as on a CPU) or its own copies (in
    groups, also those queued to the last site). Measured on a second request, whose prefill graph
    has symbolic sizes (a StaticCache's buffer lengths among them: the runner reads them off the
    graph's inputs)."""
    monkeypatch.setattr(prefill, "HELD_BYTES", held_bytes)
    monkeypatch.setattr(prefill, "PIPELINED_GROUPS", pipelined_groups)
    seen: list[weakref.ref] = []
    alive_at_each_site: list[int] = []
    take = prefill.PrefillRun.take

    def watched(run, site, keys, values, *rest):
        alive_at_each_site.append(sum(ref() is not None for ref in seen))
        seen.extend([weakref.ref(keys), weakref.ref(values)])
        return take(run, site, keys, values, *rest)

    monkeypatch.setattr(prefill.PrefillRun, "take", watched)
    calls = counting_compressions(monkeypatch)
    out = generate({}, steps=2, warm_up=True, cache_implementation=cache)
    assert alive_at_each_site[-LAYERS:] == [0] * LAYERS
    last_request = {4: one_by_one([1] * LAYERS), 1: pipelined([LAYERS]), 2: pipelined([2, 2])}[pipelined_groups]
    assert calls[-len(last_request):] == last_request
    assert all(attached(layer.keys) is not None for layer in output_cache(out).layers)


def test_a_layer_kept_exact_keeps_its_own_copy_of_the_cache(monkeypatch):
    """A layer whose compressed form would not be smaller (a 4-token span: the basis outweighs the
    channels saved) keeps HF's exact Keys and Values: a copy the run made, not a graph buffer."""
    monkeypatch.setattr(prefill, "HELD_BYTES", {})
    model = four_layer_llama()
    with torch.no_grad():
        exact = model.generate(**padded_prompt(length=40), max_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
    model.compile(backend=rotatek_compile.backend(key_channels=8, inner="eager"))
    with torch.no_grad():
        kept = model.generate(**padded_prompt(length=40), max_new_tokens=3, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)
    assert all(attached(layer.keys) is None for layer in output_cache(kept).layers)
    assert torch.equal(kept.sequences, exact.sequences)
    for mine, theirs in zip(kept.logits, exact.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_causal_flag_is_read_once_per_prefill(cache, monkeypatch):
    """Every layer's prefill attention asks whether the mask is plainly causal; the flag is read
    from the device once per graph call. On a GPU a read per layer made the host wait for the
    device at every layer, so it never queued the prefill ahead of the device."""
    inner, calls, reads = ops._is_plain_causal, [], []

    def spied(causal):
        with HostReads() as host:
            value = inner(causal)
        calls.append(causal)
        reads.extend(host.reads)
        return value

    monkeypatch.setattr(ops, "_is_plain_causal", spied)
    model = four_layer_llama()
    # Inductor's own views of the flag: test_the_causal_flag_is_read_once_through_its_views (the
    # CPU code Inductor 2.11 generates for this padded prompt does not compile)
    model.compile(backend=rotatek_compile.backend(key_channels=8, inner="eager"))
    with torch.no_grad():
        for length in (40, 64):
            calls.clear(), reads.clear()
            model.generate(**padded_prompt(length=length), max_new_tokens=1, do_sample=False,
                           cache_implementation=cache)
    assert len(calls) == LAYERS and reads == ["__bool__"]


def test_the_causal_flag_is_read_once_through_its_views():
    """Inductor on a GPU passes each op call a new view of the flag's buffer (on a CPU, the buffer
    itself): views of one flag are read once, a new flag (the next graph call's) again."""
    flag = torch.tensor(True)
    with HostReads() as host:
        assert ops._is_plain_causal(flag.view(())) and ops._is_plain_causal(flag.view(()))
    assert host.reads == ["__bool__"]
    with HostReads() as host:
        assert not ops._is_plain_causal(torch.tensor(False).view(()))
    assert host.reads == ["__bool__"]


def test_the_op_outside_a_prefill_run_says_so():
    keys = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the backend's prefill runner"):
        torch.ops.rotatek.compress_site(keys, keys, torch.zeros(1, 2, 1, 8), None, [], 0)


def test_each_thread_feeds_its_own_run():
    """Two threads inside a prefill at once: each graph's sites reach the run of its own thread."""
    barrier, seen = threading.Barrier(2), {}

    def prefill_in_thread(name):
        run = object()  # what the runner would make current
        with prefill.running(run):
            barrier.wait()  # both threads inside their runs
            seen[name] = prefill.current() is run
            barrier.wait()

    threads = [threading.Thread(target=prefill_in_thread, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": True, "b": True}
