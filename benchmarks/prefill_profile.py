"""Where a compiled prefill spends its time and memory: eager HF vs ``model.compile()`` vs rotatek.

    python benchmarks/prefill_profile.py --out $OUT              # GPU: 8 layers of the 8B shape, 16k
    python benchmarks/prefill_profile.py --tiny                  # CPU smoke run of the same code

Recipes (``--recipes``) as in ``benchmarks/model_decode.py``: ``eager``, ``inductor``, ``rotatek``,
``rotatek-inner-eager`` on a ``DynamicCache``; ``static`` (eager prefill), ``rotatek-static``
(``mode="reduce-overhead"``) and ``rotatek-static-no-graphs`` (the default mode) on a ``StaticCache``.
For each recipe: prefills on the ``--warmup`` lengths (so that the prefill graph is compiled with
dynamic shapes, as generation compiles it), one at the measured length to compile, one to check that
nothing recompiles, then the timed prefill (ms, peak memory above what was held before it) and a
profiled one whose heaviest GPU kernels are printed. The kernel names say which SDPA implementation
ran (``flash``, ``fmha_cutlass``/``efficient``: memory-efficient, ``cudnn``, or ``bmm`` +
``softmax``: the math fallback). On a GPU, the tensors alive at the timed prefill's peak are listed
by the line that allocated them (generated Inductor code, transformers or rotatek_compile), so that
what makes the peak is named. JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import linecache
import sys
import time
from collections import Counter

import torch
from transformers import DynamicCache, StaticCache

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rotatek_compile  # noqa: E402
from rotatek_compile.hf_compat import cache_kwargs  # noqa: E402
from model_decode import _sync, build_model, device_time_by_op  # noqa: E402

logger = logging.getLogger("prefill_profile")
RECIPES = ("eager", "inductor", "rotatek", "rotatek-inner-eager", "static", "rotatek-static",
           "rotatek-static-no-graphs")
STATIC_ROOM = 68  # a StaticCache's positions beyond the prompt (decode steps)


def compile_for(model, recipe: str, key_channels: int):
    torch._dynamo.reset()
    model._compiled_call_impl = None
    if recipe == "inductor":
        model.compile()
    elif recipe == "rotatek":
        model.compile(backend=rotatek_compile.backend(key_channels=key_channels, span="prompt"))
    elif recipe == "rotatek-inner-eager":
        model.compile(backend=rotatek_compile.backend(key_channels=key_channels, span="prompt", inner="eager"))
    elif recipe == "rotatek-static":
        model.compile(backend=rotatek_compile.backend(key_channels=key_channels, span="prompt",
                                                      mode="reduce-overhead"))
    elif recipe == "rotatek-static-no-graphs":
        model.compile(backend=rotatek_compile.backend(key_channels=key_channels, span="prompt"))
    elif recipe not in ("eager", "static"):
        raise ValueError(f"unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")


def prefill(model, input_ids: torch.Tensor, static: bool) -> float:
    """One prefill on a fresh cache (a ``StaticCache`` with room for decode steps if ``static``); seconds."""
    if static:
        cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + STATIC_ROOM)
    else:
        cache = DynamicCache(config=model.config)
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    _sync()
    del out, cache
    return time.perf_counter() - start


def _allocated_by(frames: list[dict]) -> str:
    """The innermost frame outside torch itself, with its source line: generated Inductor code names
    its buffer there (``buf12 = empty_strided_cuda(...)``)."""
    for frame in frames:
        if "/torch/" not in frame["filename"] or "torchinductor" in frame["filename"]:
            source = linecache.getline(frame["filename"], frame["line"]).strip()
            return f"{os.path.basename(frame['filename'])}:{frame['line']} {frame['name']}: {source[:100]}"
    return "torch internals"


def live_at_peak(snapshot: dict, top: int = 12) -> tuple[float, list[tuple[float, int, str]]]:
    """Replays the allocator's trace; at the moment most bytes were allocated, the live blocks
    grouped by the line that allocated them: ``(peak GB, [(GB, blocks, line), ...])`` largest first."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live, current, peak, peak_index = {}, 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            current += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])
        if current > peak:
            peak, peak_index = current, index
    live = {}
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    sizes, counts = Counter(), Counter()
    for event in live.values():
        where = _allocated_by(event.get("frames", []))
        sizes[where] += event["size"]
        counts[where] += 1
    return peak / 1e9, [(size / 1e9, counts[where], where) for where, size in sizes.most_common(top)]


def sdpa_kind(names: list[str]) -> str:
    joined = " ".join(names).lower()
    for key, kind in (("flash", "flash"), ("cudnn", "cudnn"), ("fmha", "efficient"), ("efficient", "efficient")):
        if key in joined:
            return kind
    return "math or other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16444)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--key-channels", type=int, default=32)
    parser.add_argument("--cudnn", action="store_true", help="leave cuDNN SDPA on")
    parser.add_argument("--warmup", default="256,300",
                        help="prompt lengths prefilled first (two: the prefill graph becomes dynamic); '' for none")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda" and not args.cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    tokens = 300 if args.tiny else args.tokens
    model = build_model(args.tiny, device, dtype, args.layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    rows = []
    warmups = [int(length) for length in args.warmup.split(",") if length]
    for recipe in args.recipes.split(","):
        static = recipe in ("static", "rotatek-static", "rotatek-static-no-graphs")
        compile_for(model, recipe, args.key_channels)
        torch._dynamo.utils.counters.clear()
        started = time.perf_counter()
        for length in warmups:
            prefill(model, input_ids[:, :length], static)
        prefill(model, input_ids, static)
        first = time.perf_counter() - started
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        prefill(model, input_ids, static)
        recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
        seconds = prefill(model, input_ids, static)
        peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else 0
        at_peak = []
        if device == "cuda":
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            _, at_peak = live_at_peak(snapshot)
        ops = device_time_by_op(lambda: prefill(model, input_ids, static), device)
        top = [(name[:90], ms, int(count)) for name, ms, count in ops[:10]]
        row = dict(recipe=recipe, tokens=tokens, layers=model.config.num_hidden_layers, first_s=first,
                   prefill_ms=1e3 * seconds, peak_above_weights_gb=peak / 1e9, recompiles=recompiles,
                   sdpa=sdpa_kind([name for name, _, _ in top]), top_kernels=top, live_at_peak=at_peak)
        rows.append(row)
        logger.info("%s: %.0f ms, peak %.2f GB above weights, SDPA %s, compiles %.0f s, recompiles %d",
                    recipe, row["prefill_ms"], row["peak_above_weights_gb"], row["sdpa"], first, recompiles)
        for name, ms, count in top:
            logger.info("    %8.2f ms  %4d×  %s", ms, count, name)
        logger.info("  alive at the peak (GB, blocks, allocated by):")
        for gigabytes, blocks, where in at_peak:
            logger.info("    %7.3f GB %5d×  %s", gigabytes, blocks, where)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_profile.json"), "w") as handle:
        json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       rows=rows), handle, indent=1)
    print(f"{'recipe':>20} | {'prefill ms':>10} | {'peak GB':>7} | sdpa")
    for row in rows:
        print(f"{row['recipe']:>20} | {row['prefill_ms']:>10.1f} | {row['peak_above_weights_gb']:>7.2f} | {row['sdpa']}")


if __name__ == "__main__":
    main()
