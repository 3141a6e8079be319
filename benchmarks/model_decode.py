"""Whole-model decode speed, memory and prefill overhead: rotatek vs the uncompressed model.

    python benchmarks/model_decode.py --out $OUT              # GPU: 8B-shaped Llama, bf16
    python benchmarks/model_decode.py --tiny --steps 4        # CPU smoke run of the same code

An 8B-shaped Llama decoder (32 layers, Hq 32, Hkv 8, d 128; random weights) with a prompt of
``30 + N + 30`` tokens. The rotatek backend compresses the prompt minus its last 32 tokens
(``span="prompt"``: the model has no vision tower; with one, the span is the N image tokens) to
``r = 32`` Key channels. Recipes (``--backends``), each the way a user would run it:

- ``eager``: no compilation, ``DynamicCache``;
- ``inductor``: ``model.compile()``, ``DynamicCache``;
- ``static``: HF's recipe for compiled generation: ``StaticCache``, the prefill uncompiled, the
  decode step under ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs);
- ``rotatek``: ``model.compile(backend=rotatek)``, ``DynamicCache``;
- ``rotatek-static``: ``StaticCache`` and ``model.compile(backend=rotatek, mode="reduce-overhead")``:
  the compressed cache in fixed-capacity buffers, the decode step under CUDA graphs;
- ``rotatek-autotune``: the same with ``mode="max-autotune"`` (CUDA graphs, and Inductor times
  Triton templates against cuBLAS for every matrix product, the decode step's weight GEMVs included);
- ``rotatek-static-ungrouped``: ``rotatek-static`` with ``group_products=False`` (the decode step's
  q, k, v and gate, up products as the model wrote them: the grouping's gain, measured).

A ``StaticCache`` holds ``30 + N + 30 + steps + 4`` positions (what ``generate()`` would give it).
``--max-batch N`` also finds, by trying (prefill and 3 decode steps: batch 1, then a guess from its
peak, then steps up or down and bisection), the largest batch of ``N``-token prompts each recipe
runs without running out of memory.
Each recipe is warmed up on two short prompts (so that the prefill graph is compiled with dynamic
shapes) and once at every timed size (prefill and 3 steps) before it is timed.
For every (N, batch) and recipe: prefill ms and the part the compression costs it (the device's
time in the compression's steps: :class:`CompressionTimer`),
median ms per decode step over ``--steps`` steps next to the byte floor ``(weights + KV bytes) /
--bandwidth`` (KV bytes as measured on the cache: a ``StaticCache`` counts its whole capacity,
which its decode step reads), peak memory (``prefill_peak_gb``: the weights plus what the prefill adds to the memory held
before it, so that CUDA-graph pools of earlier cases do not count), Key and KV bytes, recompilations during the timed
steps. JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rotatek_compile  # noqa: E402
from rotatek_compile.hf_compat import cache_kwargs  # noqa: E402
from rotatek_compile.state import compress_layers  # noqa: E402
from compress_cost import profile_table  # noqa: E402  (this script's folder is on the path)

logger = logging.getLogger("model_decode")
PROMPT, TEXT = 30, 30


def llama_8b_shape(tiny: bool, layers: int = 32) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                           max_position_embeddings=1 << 17)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=1 << 17, rope_theta=500000.0)


def build_model(tiny: bool, device: str, dtype: torch.dtype, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_8b_shape(tiny, layers)).to(dtype)
    for parameter in model.parameters():  # random weights of a plausible scale
        parameter.data.normal_(0, 0.02)
    return model.eval()


# the module whose prefill runs compress the layers (inside the prefill graph)
COMPRESSING_MODULE = importlib.import_module("rotatek_compile.prefill")


class CompressionTimer:
    """Adds up the time the compression costs the prefill: per group of layers that a prefill run
    compresses together, the span of each of its two steps (``count_tokens`` and
    ``compress_counted``, the run's own per-layer work such as laying a layer out for static
    shapes included) on the device's timeline, between events recorded around it and read once
    the prefill is done. Nothing is synchronised, so the compression stays queued behind the
    prefill's later layers as it is without the timer; a span includes the device's idle time
    while it waits for the step's launches (host time the prefill does not hide), not the prefill
    work queued before it. On a CPU, wall time."""

    def __init__(self, profile: bool = False):
        self.spans: list[tuple] = []  # (start, end): CUDA events, or perf_counter seconds
        self.peak_before = None  # peak memory when the first group starts compressing
        self._count = COMPRESSING_MODULE.count_tokens
        self._compress = COMPRESSING_MODULE.compress_counted
        self._profile = profile
        self._again: dict[int, tuple] = {}  # a group's inputs, copied to compress them again outside

    def install(self) -> None:
        COMPRESSING_MODULE.count_tokens = self.count_tokens
        COMPRESSING_MODULE.compress_counted = self.compress_counted

    def remove(self) -> None:
        COMPRESSING_MODULE.count_tokens = self._count
        COMPRESSING_MODULE.compress_counted = self._compress

    @property
    def seconds(self) -> float:
        """The spans' total; on a GPU, once the prefill's work is done."""
        return sum(end - start if isinstance(start, float) else start.elapsed_time(end) / 1e3
                   for start, end in self.spans)

    @staticmethod
    def _mark():
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def count_tokens(self, prefills, config):
        if self.peak_before is None:
            self.peak_before = _peak_bytes()
        # profiling: the same inputs compressed again, outside the model (copies: the graph's own
        # buffers may be reused once the compression has read them)
        again = [dataclasses.replace(p, keys=p.keys.clone(), values=p.values.clone(), queries=p.queries.clone())
                 for p in prefills] if self._profile else None
        start = self._mark()
        counts = self._count(prefills, config)
        self.spans.append((start, self._mark()))
        if again is not None:
            self._again[id(counts)] = (again, config)
        return counts

    def compress_counted(self, counts):
        again = self._again.pop(id(counts), None)
        start = self._mark()
        try:  # the run takes as many layers as it gave
            yield from self._compress(counts)
        finally:
            self.spans.append((start, self._mark()))
            if again is not None:
                self._profile_outside(*again)

    def _profile_outside(self, prefills: list, config) -> None:
        """Time the same compression outside the model, then log the profiler's table of it."""
        _sync()
        inside = self.seconds
        start = time.perf_counter()
        list(compress_layers([dataclasses.replace(prefill) for prefill in prefills], config))
        _sync()
        logger.info("compression: %.1f ms in the model, %.1f ms on the same inputs outside it",
                    1e3 * inside, 1e3 * (time.perf_counter() - start))
        device = prefills[0].keys.device if prefills else torch.device("cpu")
        logger.info("%s", profile_table(lambda: list(compress_layers(prefills, config)), device,
                                        "compression outside the model"))


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled(run, device: str) -> torch.profiler.profile:
    """The profile of ``run()`` (host ops; CUDA kernels too on ``device="cuda"``), synchronised."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
        _sync()
    return profile


def device_time_by_op(run, device: str, calls: int = 1) -> list[tuple[str, float, float]]:
    """Profiles ``run()`` (which makes ``calls`` calls of what is measured): every op and kernel,
    heaviest on the device first, as ``(name, device ms per call, count per call)``."""
    profile = profiled(run, device)
    events = sorted(profile.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))
    return [(e.key, getattr(e, "self_device_time_total", 0) / 1e3 / calls, e.count / calls) for e in events]


def _peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


RECIPES = ("eager", "inductor", "static", "rotatek", "rotatek-static", "rotatek-autotune", "rotatek-static-ungrouped")
EXTRA_POSITIONS = 4  # a StaticCache's room beyond the prompt and the timed steps (warm-up, profile)


def static_capacity(span: int, steps: int) -> int:
    """Positions of the StaticCache for a ``30 + span + 30``-token prompt and ``steps`` decode
    steps: warm-ups must use the timed case's capacity, so that its decode graph is the timed one."""
    return PROMPT + span + TEXT + steps + EXTRA_POSITIONS


def set_recipe(model, name: str, args) -> tuple:
    """Compile ``model`` for recipe ``name``; returns ``(prefill, decode, cache kind)`` callables."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model._compiled_call_impl = None  # undo an earlier model.compile()
    rotatek = dict(key_channels=args.key_channels, span="prompt", solver=args.solver)
    if name == "eager":
        return model, model, "dynamic"
    if name == "inductor":
        model.compile()  # automatic dynamic shapes; dynamic=True slowed inductor decode ~40x
        return model, model, "dynamic"
    if name == "static":  # prefill uncompiled, decode step captured (HF's generate() does the same)
        return model, torch.compile(model, mode="reduce-overhead"), "static"
    if name == "rotatek":
        model.compile(backend=rotatek_compile.backend(**rotatek))
        return model, model, "dynamic"
    if name in ("rotatek-static", "rotatek-autotune", "rotatek-static-ungrouped"):
        mode = "max-autotune" if name == "rotatek-autotune" else "reduce-overhead"
        grouped = name != "rotatek-static-ungrouped"
        model.compile(backend=rotatek_compile.backend(**rotatek, mode=mode, group_products=grouped))
        return model, model, "static"
    raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")


def new_cache(model, kind: str, capacity: int):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=capacity)
    return DynamicCache(config=model.config)


def run_case(model, recipe: tuple, batch: int, span: int, steps: int, device: str, profile: bool = False,
             capacity: int = 0) -> dict:
    """Prefill ``batch`` prompts of ``30 + span + 30`` tokens, then ``steps`` greedy decode steps.

    ``capacity``: positions of a ``StaticCache`` (0: just enough for this case).
    """
    prefill_fn, decode_fn, kind = recipe
    length = PROMPT + span + TEXT
    capacity = capacity or static_capacity(span, steps)
    generator = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    timer = CompressionTimer(profile=profile)
    timer.install()
    try:
        cache = new_cache(model, kind, capacity)
        held_before = 0  # weights, and CUDA-graph pools of earlier cases (not this prefill's)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            held_before = torch.cuda.memory_allocated()
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = prefill_fn(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        _sync()
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        del out
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        step_seconds = []
        with torch.no_grad():
            for _ in range(steps):
                _sync()
                start = time.perf_counter()
                out = decode_fn(input_ids=token, **cache_kwargs(cache), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                _sync()
                step_seconds.append(time.perf_counter() - start)
        if profile:
            with torch.profiler.profile() as prof, torch.no_grad():
                for _ in range(3):
                    out = decode_fn(input_ids=token, **cache_kwargs(cache), use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                _sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        memory = rotatek_compile.cache_bytes(cache)
        return dict(
            batch=batch, span=span, tokens=length,
            prefill_ms=1e3 * prefill, compression_ms=1e3 * timer.seconds,
            decode_ms=1e3 * statistics.median(step_seconds[2:] if steps > 4 else step_seconds),
            peak_gb=_peak_bytes() / 1e9, key_bytes=memory.keys, kv_bytes=memory.total,
            # what this prefill needs on top of the weights: its peak less what was held before it
            prefill_peak_gb=(_peak_bytes() - held_before + _weight_bytes(model)) / 1e9,
            peak_before_compression_gb=(timer.peak_before or 0) / 1e9,
            span_key_bytes=memory.span_keys,
            recompiles=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before,
        )
    finally:
        timer.remove()


def by_pipelined_groups(run, values: list[int], repeats: int = 3) -> dict:
    """``run()`` ``repeats`` times with ``prefill.PIPELINED_GROUPS`` set to each of ``values``:
    ``{groups: {"prefill_ms": median, "compression_ms": median}}``, in alternation (value by value
    within each repeat), so that a drift of the device's clocks touches every value alike."""
    default = COMPRESSING_MODULE.PIPELINED_GROUPS
    rows: dict[int, list[dict]] = {groups: [] for groups in values}
    try:
        for _ in range(repeats):
            for groups in values:
                COMPRESSING_MODULE.PIPELINED_GROUPS = groups
                rows[groups].append(run())
    finally:
        COMPRESSING_MODULE.PIPELINED_GROUPS = default
    return {groups: {name: statistics.median(row[name] for row in runs) for name in ("prefill_ms", "compression_ms")}
            for groups, runs in rows.items()}


def largest_fitting(fits, limit: int, guess: int = 1) -> int:
    """The largest batch ``B <= limit`` with ``fits(B)`` true, found by trying: from ``guess``,
    steps of 1, 2, 4, ... up while it fits (down while it does not), then bisecting between the
    largest that fitted and the smallest that did not (``fits`` is monotone: a batch that does not
    fit makes every larger one fail too). 0 if batch 1 does not fit. A good guess costs two tries."""
    good, bad = 0, limit + 1
    batch, step = min(max(guess, 1), limit), 1
    if fits(batch):
        good = batch
        while good + step < bad:
            if not fits(good + step):
                bad = good + step
                break
            good, step = good + step, 2 * step
    else:
        bad = batch
        while bad - step > good:
            if fits(bad - step):
                good = bad - step
                break
            bad, step = bad - step, 2 * step
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def max_batch(model, recipe: tuple, span: int, device: str, limit: int, guess: int = 0) -> dict:
    """Tries prefill + 3 decode steps of ``B`` prompts of ``30 + span + 30`` tokens; the largest
    ``B`` that runs without running out of memory. The first try is ``guess``, or else ``B = 1``,
    whose peak guesses how many such rows the free memory holds (then :func:`largest_fitting` tries:
    each new batch size of a compiled recipe costs a compilation)."""
    tried, added = {}, {}

    def fits(batch: int) -> bool:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        try:
            run_case(model, recipe, batch, span, 3, device)
            tried[batch] = True
            added[batch] = _peak_bytes() - held  # what the request needed beyond what was held
        except torch.cuda.OutOfMemoryError:
            tried[batch] = False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("max batch at %d tokens: B = %d %s", span, batch, "fits" if tried[batch] else "out of memory")
        return tried[batch]

    if not guess and fits(1) and torch.cuda.is_available() and added[1] > 0:
        free = torch.cuda.mem_get_info()[1] - torch.cuda.memory_allocated()  # the device's memory less what is held
        guess = max(1, int(free // added[1]))
    guess = guess or 1
    found = largest_fitting(lambda batch: tried[batch] if batch in tried else fits(batch), limit, guess)
    return dict(span=span, max_batch=found, tried=tried, limit=limit, guess=guess,
                added_gb_at_batch_1=added.get(1, 0) / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2-layer model, CPU-sized spans")
    parser.add_argument("--backends", default=",".join(RECIPES), help=f"recipes, of {', '.join(RECIPES)}")
    parser.add_argument("--bandwidth", type=float, default=4.27e12,
                        help="copy bandwidth in bytes/s for the byte floor (H200 measured: 4.27e12)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated BATCHxSPAN; none: only --max-batch (default: 1x16384,1x32768,"
                             "1x65536,8x32768; with --tiny 1x256,2x256)")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape")
    parser.add_argument("--profile", action="store_true",
                        help="print a profile of 3 decode steps and of the prefill's compression, which is "
                             "also timed on the same inputs outside the model (first case, on its untimed "
                             "run at the timed size)")
    parser.add_argument("--sdpa", choices=["flash", "default"], default="flash",
                        help="flash: turn cuDNN SDPA off for both backends (it re-plans every decode step)")
    parser.add_argument("--key-channels", type=int, default=32)
    parser.add_argument("--solver", default="auto", help="rotatek's basis solver: auto, eigh or subspace")
    parser.add_argument("--max-batch", type=int, default=0, metavar="SPAN",
                        help="also find, by trying, the largest batch of SPAN-token prompts each recipe runs")
    parser.add_argument("--max-batch-limit", type=int, default=64, help="largest batch --max-batch tries")
    parser.add_argument("--max-batch-guess", type=int, default=0,
                        help="--max-batch's first try (default: guessed from batch 1's peak)")
    parser.add_argument("--solver-log", action="store_true",
                        help="log each basis solve's Cholesky breakdowns (rotatek_compile.kernels.reference "
                             "DEBUG: a host read per solve, so the compression no longer overlaps the prefill)")
    parser.add_argument("--pipelined-groups", default="",
                        help="rotatek recipes: also time each case's prefill (median of 3, with 2 decode steps) "
                             "with prefill.PIPELINED_GROUPS set to each of these comma-separated values "
                             "(1: one group, compressed at the last site, nothing overlapped)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.solver_log:
        logging.getLogger("rotatek_compile.kernels.reference").setLevel(logging.DEBUG)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.cases is None:
        args.cases = "1x256,2x256" if args.tiny else "1x16384,1x32768,1x65536,8x32768"
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",") if case not in ("", "none")]
    if args.sdpa == "flash" and device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch._dynamo.config.recompile_limit = 64  # warm-ups over several batch sizes and lengths
    model = build_model(args.tiny, device, dtype, args.layers)
    os.makedirs(args.out, exist_ok=True)
    lines = open(os.path.join(args.out, "model_decode.jsonl"), "a")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results, batches = [], []
    for backend_name in args.backends.split(","):
        recipe = set_recipe(model, backend_name, args)
        started = time.perf_counter()
        # warm-up: compile the prefill and both decode graphs, for every batch size, on short prompts;
        # a StaticCache gets each timed case's capacity, so that its decode graph is the timed one
        for batch in sorted({batch for batch, _ in cases}):
            if recipe[2] == "dynamic":
                run_case(model, recipe, batch, 256, 3, device)
                run_case(model, recipe, batch, 300, 3, device)
                continue
            for span in sorted({span for b, span in cases if b == batch}):  # prompts that fit the capacity
                capacity = static_capacity(span, args.steps)
                run_case(model, recipe, batch, min(256, span // 2), 3, device, capacity=capacity)
                run_case(model, recipe, batch, min(300, span // 2 + 8), 3, device, capacity=capacity)
        logger.info("%s: compiled in %.0f s", backend_name, time.perf_counter() - started)
        for batch, span in cases:
            try:
                # once at the timed size: a 64k prefill recompiled inside its timed call after short
                # warm-ups (Inductor specialises on size, e.g. 64-bit indexing past 2^31 mask elements)
                capacity = static_capacity(span, args.steps) if recipe[2] == "static" else 0
                # (and the profile, if asked: it compresses again outside the model inside the
                # prefill, and keeps every layer's inputs alive, so it is not the timed call)
                run_case(model, recipe, batch, span, 3, device, capacity=capacity,
                         profile=args.profile and span == cases[0][1])
                row = run_case(model, recipe, batch, span, args.steps, device, capacity=capacity)
                row["floor_ms"] = 1e3 * (weight_bytes + row["kv_bytes"]) / args.bandwidth
                if args.pipelined_groups and backend_name.startswith("rotatek"):
                    row["by_pipelined_groups"] = by_pipelined_groups(
                        lambda: run_case(model, recipe, batch, span, 2, device, capacity=capacity),
                        [int(groups) for groups in args.pipelined_groups.split(",")])
            except torch.cuda.OutOfMemoryError:
                row = dict(batch=batch, span=span, error="out of memory")
                torch.cuda.empty_cache()
            row["backend"] = backend_name
            results.append(row)
            logger.info("%s", json.dumps(row))
            lines.write(json.dumps(row) + "\n")
            lines.flush()
        if args.max_batch:
            found = dict(max_batch(model, recipe, args.max_batch, device, args.max_batch_limit, args.max_batch_guess),
                         backend=backend_name)
            batches.append(found)
            lines.write(json.dumps(found) + "\n")
            lines.flush()
    import transformers

    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"),
                  weight_bytes=weight_bytes, bandwidth=args.bandwidth, key_channels=args.key_channels,
                  solver=args.solver, steps=args.steps, layers=model.config.num_hidden_layers, sdpa=args.sdpa,
                  results=results, max_batch=batches)
    with open(os.path.join(args.out, "model_decode.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print_table(report)


def print_table(report: dict) -> None:
    _print_cases(report)
    for found in report.get("max_batch", []):
        print(f"max batch at {found['span']} tokens, {found['backend']}: {found['max_batch']} "
              f"(tried {found['tried']}, limit {found['limit']})")


def _print_cases(report: dict) -> None:
    """One row per (batch, N, recipe): decode against its byte floor, prefill, memory, recompiles."""
    print(f"{'B':>3} {'N':>6} {'recipe':>14} | {'decode ms':>9} {'floor ms':>8} {'x floor':>7} | "
          f"{'prefill ms':>10} {'of it pca':>9} | {'peak GB':>7} | {'K bytes':>9} {'KV bytes':>9} | recompiles")
    for row in sorted(report["results"], key=lambda r: (r["batch"], r["span"], RECIPES.index(r["backend"]))):
        if "error" in row:
            print(f"{row['batch']:>3} {row['span']:>6} {row['backend']:>14} | {row['error']}")
            continue
        print(f"{row['batch']:>3} {row['span']:>6} {row['backend']:>14} | {row['decode_ms']:>9.2f} "
              f"{row['floor_ms']:>8.2f} {row['decode_ms'] / row['floor_ms']:>7.2f} | {row['prefill_ms']:>10.0f} "
              f"{row['compression_ms']:>9.0f} | {row.get('prefill_peak_gb', row['peak_gb']):>7.2f} | {row['key_bytes'] / 1e9:>9.3f} "
              f"{row['kv_bytes'] / 1e9:>9.3f} | {row['recompiles']}")
        for groups, timed in row.get("by_pipelined_groups", {}).items():
            print(f"{'':>3} {'':>6} {'':>14}   pipelined groups {groups}: prefill {timed['prefill_ms']:.0f} ms, "
                  f"of it compression {timed['compression_ms']:.1f} ms (medians of 3)")


if __name__ == "__main__":
    main()
