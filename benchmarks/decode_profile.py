"""Where a decode step's time goes, and what holds the prefill's peak memory.

    python benchmarks/decode_profile.py --out $OUT      # GPU: 8 layers of the 8B shape, 16k
    python benchmarks/decode_profile.py --tiny          # CPU smoke run of the same code

For each recipe (``benchmarks/model_decode.py``'s): after the warm-up, ``--steps`` decode steps
timed three ways: wall (synchronised), host (the call's own time, not synchronised: what Python,
Dynamo's guards and the CUDA-graph replay cost on the CPU) and device (CUDA events around the
call). Then the CUDA kernels of 3 profiled steps (count and summed device time per step, each
kernel's share, the last step's kernels in launch order; the table's "between" is the device time
less the kernels', per launch) and a Python profile of the host side (the functions that cost
most). For the prefill: the live allocations at the peak of one prefill, grouped by the line of
code (Inductor's generated code, or ours) that made them. ``--inductor name=value,...`` sets
Inductor options for every recipe (e.g. ``combo_kernels=True``). JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import cProfile
import collections
import io
import json
import linecache
import logging
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rotatek_compile.hf_compat import cache_kwargs  # noqa: E402
from model_decode import (  # noqa: E402
    PROMPT, TEXT, _sync, build_model, new_cache, profiled, run_case, set_recipe, static_capacity)

logger = logging.getLogger("decode_profile")


def _prefill(model, recipe, span: int, steps: int, device: str):
    prefill_fn, _, kind = recipe
    length = PROMPT + span + TEXT
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    cache = new_cache(model, kind, static_capacity(span, steps))
    with torch.no_grad():
        out = prefill_fn(input_ids=ids.to(device), **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


def time_steps(model, recipe, span: int, steps: int, device: str) -> dict:
    """Wall, host and device ms of each decode step (medians)."""
    _, decode_fn, _ = recipe
    cache, token = _prefill(model, recipe, span, 2 * steps + 8, device)
    wall, host, gpu = [], [], []
    cuda = device == "cuda"
    with torch.no_grad():
        for _ in range(steps):
            _sync()
            begin = torch.cuda.Event(enable_timing=True) if cuda else None
            end = torch.cuda.Event(enable_timing=True) if cuda else None
            if cuda:
                begin.record()
            start = time.perf_counter()
            out = decode_fn(input_ids=token, **cache_kwargs(cache), use_cache=True)
            returned = time.perf_counter()
            if cuda:
                end.record()
            token = out.logits[:, -1:].argmax(-1)
            _sync()
            done = time.perf_counter()
            host.append(returned - start)
            wall.append(done - start)
            if cuda:
                gpu.append(begin.elapsed_time(end) / 1e3)
        kernels = _kernel_table(decode_fn, cache, token, device)
        host_profile = _host_profile(decode_fn, cache, token, steps)
    median = lambda xs: 1e3 * statistics.median(xs[2:]) if xs else 0.0  # noqa: E731
    return dict(wall_ms=median(wall), host_ms=median(host), device_ms=median(gpu),
                kernels=kernels, host_profile=host_profile)


def _kernel_table(decode_fn, cache, token, device: str, steps: int = 3) -> dict:
    """The kernels of ``steps`` decode steps: per-step count and summed device time, every kernel's
    per-step share (heaviest first), and the order in which the last step launched them."""
    def run():
        step = token
        for _ in range(steps):
            out = decode_fn(input_ids=step, **cache_kwargs(cache), use_cache=True)
            step = out.logits[:, -1:].argmax(-1)

    kernels = [e for e in profiled(run, device).events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for kernel in kernels:
        by_name[kernel.name][0] += kernel.device_time_total / 1e3 / steps
        by_name[kernel.name][1] += 1 / steps
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    last_step = ordered[-round(len(ordered) / steps):] if ordered else []
    return dict(device_ms_per_step=sum(ms for ms, _ in by_name.values()), kernels_per_step=len(kernels) / steps,
                top=[(name[:100], ms, count) for name, (ms, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])],
                order=[(e.name[:100], e.device_time_total / 1e3) for e in last_step])


def _host_profile(decode_fn, cache, token, steps: int) -> list:
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(steps):
            out = decode_fn(input_ids=token, **cache_kwargs(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue().splitlines()[-40:]


def prefill_peak(model, recipe, span: int, device: str, top: int = 25) -> dict:
    """The allocations alive at the peak of one prefill, grouped by the code line that made them."""
    if device != "cuda":
        return {}
    _sync()
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(max_entries=500000, stacks="python")
    base = torch.cuda.memory_allocated()
    cache, _ = _prefill(model, recipe, span, 8, device)
    _sync()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    del cache
    live, total, peak, peak_live = {}, 0, 0, {}
    for trace in snapshot["device_traces"]:
        for event in trace:
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
            if total > peak:
                peak, peak_live = total, dict(live)
    groups = collections.defaultdict(lambda: [0, 0])
    for event in peak_live.values():
        where = _where(event.get("frames", []))
        groups[where][0] += event["size"]
        groups[where][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(base_gb=base / 1e9, traced_peak_gb=peak / 1e9,
                at_peak=[(where, size / 1e9, count) for where, (size, count) in rows])


def _where(frames: list) -> str:
    """The innermost frame in generated or project code, with its source line (and, for Inductor's
    generated code, the graph nodes it computes)."""
    for frame in frames:
        name = frame["filename"]
        if "torchinductor" in name or "rotatek_compile" in name or "transformers" in name:
            line = linecache.getline(name, frame["line"]).strip()
            nodes = ""
            if "torchinductor" in name:
                for back in range(frame["line"] - 1, max(frame["line"] - 40, 0), -1):
                    text = linecache.getline(name, back)
                    if "Source Nodes" in text:
                        nodes = text.strip()[:160]
                        break
            return f"{os.path.basename(name)}:{frame['line']} {frame['name']}: {line[:140]} {nodes}"
    return "(no generated or project frame)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--span", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--recipes", default="rotatek-static,static,rotatek")
    parser.add_argument("--key-channels", type=int, default=32)
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--inductor", default="",
                        help="Inductor settings for every recipe, as name=value,… (e.g. combo_kernels=True)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    with torch._inductor.config.patch(_settings(args.inductor)):
        profile_recipes(args)


def _settings(text: str) -> dict:
    """``"a=True,b.c=3"`` → ``{"a": True, "b.c": 3}``."""
    settings = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        settings[name.strip()] = ast.literal_eval(value.strip())
    return settings


def profile_recipes(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    span = 256 if args.tiny else args.span
    torch._dynamo.config.recompile_limit = 64
    model = build_model(args.tiny, device, dtype, args.layers)
    rows = []
    for name in args.recipes.split(","):
        recipe = set_recipe(model, name, args)
        started = time.perf_counter()
        capacity = static_capacity(span, 2 * args.steps + 8)  # what time_steps' cache gets
        for warm in (min(256, span // 2), min(300, span // 2 + 8)):
            run_case(model, recipe, 1, warm, 3, device, capacity=capacity if recipe[2] == "static" else 0)
        row = dict(recipe=name, span=span, layers=args.layers, compile_s=time.perf_counter() - started)
        row.update(time_steps(model, recipe, span, args.steps, device))
        row["prefill"] = prefill_peak(model, recipe, span, device)
        rows.append(row)
        logger.info("%s: wall %.2f ms, host %.2f ms, device %.2f ms per step; kernels %.1f ms in %.0f launches",
                    name, row["wall_ms"], row["host_ms"], row["device_ms"], row["kernels"]["device_ms_per_step"],
                    row["kernels"]["kernels_per_step"])
        for kernel, ms, count in row["kernels"]["top"][:25]:
            logger.info("    %7.3f ms %6.1f×  %s", ms, count, kernel)
        logger.info("the first %d launches of a step, in order (µs):", min(48, len(row["kernels"]["order"])))
        for kernel, ms in row["kernels"]["order"][:48]:
            logger.info("    %7.1f  %s", 1e3 * ms, kernel)
        logger.info("\n".join(row["host_profile"]))
        if row["prefill"]:
            logger.info("prefill: traced peak %.2f GB above %.2f GB held before", row["prefill"]["traced_peak_gb"],
                        row["prefill"]["base_gb"])
            for where, gb, count in row["prefill"]["at_peak"]:
                logger.info("    %6.3f GB %4d×  %s", gb, count, where)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_profile.json"), "w") as handle:
        json.dump(dict(torch=torch.__version__, inductor=args.inductor, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       rows=rows), handle, indent=1)
    print(f"{'recipe':>16} | {'wall ms':>8} {'host ms':>8} {'device ms':>9} | {'kernel ms':>9} {'launches':>8} "
          f"{'between µs':>10}")
    for row in rows:
        kernels = row["kernels"]
        between = 1e3 * (row["device_ms"] - kernels["device_ms_per_step"]) / max(kernels["kernels_per_step"], 1)
        print(f"{row['recipe']:>16} | {row['wall_ms']:>8.2f} {row['host_ms']:>8.2f} {row['device_ms']:>9.2f} | "
              f"{kernels['device_ms_per_step']:>9.2f} {kernels['kernels_per_step']:>8.0f} {between:>10.2f}")


if __name__ == "__main__":
    main()
