"""Decode-kernel benchmark on the RotateK paper grid (GPU): correctness, time, fraction of the byte floor.

Paper grid: Hq 32, Hkv 8, d 128, r 32, bf16; prompt 30 + visual N + text 30, so the
full-channel segment is 60 tokens and the pruned span N; B1 × N ∈ {16k, 32k, 64k, 128k} and
N 16k × B ∈ {4, 16, 32}.

Per case: median µs of ``decode_attention_triton`` for every launch variant with
``triton.testing.do_bench`` (which zeroes a 256 MB buffer before each call) while rotating through
enough input sets to exceed the 50 MB L2 several times; the same under CUDA-graph replay (a graph of
back-to-back calls over the rotating sets: device time without host launch cost); the dense
``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)`` on full Keys of the same sequence, both
ways; the byte floor (K̃ + span V + full K + full V over the measured device-to-device copy
bandwidth). B1 16k also reports host µs per call and the device µs of each kernel. ``--baseline
FILE`` times another version of ``triton_decode.py`` next to this one, as variant ``baseline``
(e.g. ``git show REV:rotatek_compile/kernels/triton_decode.py > /tmp/prev.py``).
Correctness: every variant against ``reference.decode_attention`` in bf16 on fresh random inputs
with padding masks, rel. L2 ≤ 1e-2. JSON and logs go to ``--out``; the tables to stdout.

    PYTHONPATH=. python3 benchmarks/decode_kernel.py --out $OUT [--cases 1x16384,32x16384] [--baseline FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib.util
import io
import json
import math
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from rotatek_compile.kernels import reference
from rotatek_compile.kernels import triton_decode as td

Q_HEADS, KV_HEADS, DIM, RANK, FULL = 32, 8, 128, 32, 60
DTYPE = torch.bfloat16
GRID = [(1, 16384), (1, 32768), (1, 65536), (1, 131072), (4, 16384), (16, 16384), (32, 16384)]
# Earlier targets (µs, H100), and B1 16k's under graph replay as a multiple of its byte floor.
TARGETS = {(32, 16384): 475.0, (1, 131072): 118.0, (16, 16384): 237.0}
GRAPH_TARGET_FLOORS = 1.3
ROTATE_BYTES = 256 * 2**20  # input sets per case: at least this many bytes in all (L2 is 50 MB)
REL_L2_MAX = 1e-2

C = td.DecodeConfig
VARIANTS = {
    "default": None,  # td.default_config(...): what decode_attention_triton launches
    "c3": C(ctas_per_sm=3),
    "n128s2c3": C(block_n=128, num_stages=2, ctas_per_sm=3),
    "r96c5": C(maxnreg=96, ctas_per_sm=5),
}
BASELINE = "baseline"  # the variant of --baseline FILE: that module's decode_attention_triton
# Forced split counts (graph replay, default config otherwise) at a few cases.
SPLIT_SWEEP = {(1, 16384): [16, 33, 66, 132], (4, 16384): [12, 16, 17, 32]}


def pruned_inputs(batch, span, keep=1.0, device="cuda"):
    """One input set in ``decode_attention`` order; ``keep`` < 1 pads rows at random."""
    q = torch.randn(batch, Q_HEADS, DIM, device=device, dtype=DTYPE)
    basis = torch.linalg.qr(torch.randn(KV_HEADS, DIM, DIM, device=device))[0][..., :RANK]
    # R [B, H, d, r] and δμ [B, H, d] in the cache dtype, as the compressed cache stores them
    rotation = basis.expand(batch, -1, -1, -1).to(DTYPE).contiguous()
    mean_residual = (0.3 * torch.randn(batch, KV_HEADS, DIM, device=device)).to(DTYPE)
    span_keys = torch.randn(batch, KV_HEADS, span, RANK, device=device, dtype=DTYPE)
    span_values = torch.randn(batch, KV_HEADS, span, DIM, device=device, dtype=DTYPE)
    span_mask = torch.rand(batch, span, device=device) < keep
    keys = torch.randn(batch, KV_HEADS, FULL, DIM, device=device, dtype=DTYPE)
    values = torch.randn(batch, KV_HEADS, FULL, DIM, device=device, dtype=DTYPE)
    mask = torch.rand(batch, FULL, device=device) < keep
    return (q, span_keys, rotation, mean_residual, span_values, span_mask, keys, values, mask, DIM**-0.5)


def dense_inputs(batch, span, device="cuda"):
    q = torch.randn(batch, Q_HEADS, 1, DIM, device=device, dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, span + FULL, DIM, device=device, dtype=DTYPE)
    v = torch.randn(batch, KV_HEADS, span + FULL, DIM, device=device, dtype=DTYPE)
    return q, k, v


def pruned_bytes(batch, span):
    per_token_span = (RANK + DIM) * 2
    per_token_full = 2 * DIM * 2
    return batch * KV_HEADS * (span * per_token_span + FULL * per_token_full)


def dense_bytes(batch, span):
    return batch * KV_HEADS * (span + FULL) * 2 * DIM * 2


def rel_l2(out, want):
    return ((out.float() - want.float()).norm() / want.float().norm()).item()


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (1 GiB each way)."""
    src = torch.randn(2**29, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def rotating(fns):
    """A callable that runs the next of ``fns`` on each call."""
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call


def bench_us(fns):
    return 1e3 * do_bench(rotating(fns), warmup=25, rep=150, return_mode="median")


def graph_us(fns, chain_rounds=4, replays=30):
    """µs per call under CUDA-graph replay of ``chain_rounds × len(fns)`` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(chain_rounds):
            for fn in fns:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * chain_rounds * len(fns)))
    return statistics.median(times)


def host_us(fn, calls=200):
    """CPU time to launch one call (no sync inside), µs."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / calls


def guarded(measure, what):
    """``measure()``, or inf (reported) if the variant fails to compile or launch."""
    try:
        return measure()
    except Exception as exc:
        print(f"  {what}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch.cuda.synchronize()
        return math.inf


def load_module(path):
    spec = importlib.util.spec_from_file_location("baseline_triton_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kernel_call(inputs, config):
    if config is None:
        return lambda: td.decode_attention_triton(*inputs)
    if not isinstance(config, td.DecodeConfig):  # a module: --baseline
        return lambda: config.decode_attention_triton(*inputs)
    return lambda: td._decode_attention(*inputs, config=config)


def check_correctness(variants, report):
    """Every variant on padded inputs (mid-size shape), the default on every grid shape."""
    failures = []
    cases = [("variants B2 N4000 keep0.9", 2, 4000, 0.9, list(variants)),
             ("variants B3 N777 keep0.5", 3, 777, 0.5, list(variants))]
    cases += [(f"default B{b} N{n}", b, n, 1.0, ["default"]) for b, n in GRID]
    for name, batch, span, keep, names in cases:
        torch.manual_seed(hash(name) % 2**31)
        inputs = pruned_inputs(batch, span, keep)
        want = reference.decode_attention(*inputs)
        for vname in names:
            try:
                out = kernel_call(inputs, variants[vname])()
                err = rel_l2(out, want)
            except Exception as exc:  # keep going: one broken variant must not hide the others
                print(f"  {vname} on {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                err = math.inf
                out = want
            ok = err <= REL_L2_MAX and bool(torch.isfinite(out).all())
            report.append({"case": name, "variant": vname, "rel_l2": err, "ok": ok})
            if not ok:
                failures.append((name, vname, err))
        if (batch, span) == (1, 16384):  # forced split counts: dv sliced at 129
            for n in (17, 129):
                err = rel_l2(td._decode_attention(*inputs, num_splits=n), want)
                report.append({"case": name, "variant": f"splits{n}", "rel_l2": err, "ok": err <= REL_L2_MAX})
                if not err <= REL_L2_MAX:
                    failures.append((name, f"splits{n}", err))
        del inputs, want
        torch.cuda.empty_cache()
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or 'all'")
    parser.add_argument("--quick", action="store_true", help="only B1 16k and B32 16k")
    parser.add_argument("--cases", default=None, help="BxN,... (default: the paper grid)")
    parser.add_argument("--baseline", default=None, help="another triton_decode.py, timed as 'baseline'")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    variants = dict(VARIANTS) if args.variants == "all" else {k: VARIANTS[k] for k in args.variants.split(",")}
    if args.baseline:
        variants[BASELINE] = load_module(args.baseline)
    grid = [(1, 16384), (32, 16384)] if args.quick else GRID
    if args.cases:
        grid = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]

    props = torch.cuda.get_device_properties(0)
    env = {
        "date": datetime.date.today().isoformat(), "gpu": props.name, "sms": props.multi_processor_count,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda,
    }
    print(json.dumps(env), flush=True)
    result = {"env": env, "correctness": [], "cases": []}

    bandwidth = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)

    failures = check_correctness(variants, result["correctness"])
    print(f"correctness: {len(result['correctness']) - len(failures)}/{len(result['correctness'])} ok "
          f"(max rel L2 {max(r['rel_l2'] for r in result['correctness']):.2e})", flush=True)
    for f in failures:
        print("  FAIL", f, flush=True)

    for batch, span in grid:
        nbytes = pruned_bytes(batch, span)
        sets = max(2, math.ceil(ROTATE_BYTES / nbytes))
        inputs = [pruned_inputs(batch, span) for _ in range(sets)]
        case = {"batch": batch, "span": span, "bytes": nbytes, "sets": sets,
                "floor_us": nbytes / bandwidth * 1e6, "variants": {}}
        replays = 30 if nbytes < 2**28 else 8
        for vname, config in variants.items():
            cfg = config if isinstance(config, td.DecodeConfig) else td.default_config(DTYPE, DIM, DIM)
            splits, _ = td.plan_splits(span + FULL, batch * KV_HEADS, cfg.block_n,
                                       props.multi_processor_count, cfg)
            fns = [kernel_call(x, config) for x in inputs]
            us = guarded(lambda: bench_us(fns), f"B{batch} N{span} {vname}")
            gus = guarded(lambda: graph_us(fns, replays=replays), f"graph B{batch} N{span} {vname}")
            case["variants"][vname] = {"us": us, "graph_us": gus, "splits": splits}
        if (batch, span) == (1, 16384):
            case["host"] = host_report(inputs[0], args.out)
            case["kernels"] = {v: kernel_breakdown(kernel_call(inputs[0], variants[v]), args.out, v)
                               for v in ("default", BASELINE) if v in variants}
        if (batch, span) in SPLIT_SWEEP and not args.quick:
            case["split_sweep"] = {}
            for n in SPLIT_SWEEP[(batch, span)]:
                fns = [lambda x=x, n=n: td._decode_attention(*x, num_splits=n) for x in inputs]
                case["split_sweep"][n] = guarded(lambda: graph_us(fns, replays=replays), f"sweep {n}")
            print(f"B{batch} N{span} split sweep, graph us: "
                  + ", ".join(f"{n}: {t:.1f}" for n, t in case["split_sweep"].items()), flush=True)
        del inputs, fns
        torch.cuda.empty_cache()

        dsets = max(2, math.ceil(ROTATE_BYTES / dense_bytes(batch, span)))
        dense = [dense_inputs(batch, span) for _ in range(dsets)]
        fns = [lambda x=x: F.scaled_dot_product_attention(*x, enable_gqa=True) for x in dense]
        case["dense_us"] = bench_us(fns)
        case["dense_graph_us"] = graph_us(fns, replays=replays)
        del dense, fns
        torch.cuda.empty_cache()
        case["best"] = min(case["variants"], key=lambda v: case["variants"][v]["us"])
        case["best_graph"] = min(case["variants"], key=lambda v: case["variants"][v]["graph_us"])
        result["cases"].append(case)
        d = case["variants"]["default"]
        print(f"B{batch} N{span}: default {d['us']:.1f} us (graph {d['graph_us']:.1f}), "
              f"best {case['best']} {case['variants'][case['best']]['us']:.1f} us, "
              f"dense {case['dense_us']:.1f} us (graph {case['dense_graph_us']:.1f})", flush=True)

    with open(os.path.join(args.out, "decode_kernel.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print_tables(result, variants, env, bandwidth)
    if failures:
        print(f"{len(failures)} correctness failures")
        sys.exit(1)


def host_report(inputs, out_dir):
    """Host µs per call (fast launch on / off) and the top of a cProfile of the fast path."""
    report = {}
    for fast in (False, True):
        td.FAST_LAUNCH = fast
        report["fast" if fast else "jit"] = host_us(kernel_call(inputs, None))
    td.FAST_LAUNCH = True
    fn = kernel_call(inputs, None)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    with open(os.path.join(out_dir, "host_profile.txt"), "w") as fh:
        fh.write(text.getvalue())
    return report


def kernel_breakdown(fn, out_dir, name, calls=40):
    """Average device µs of each kernel one call launches (torch.profiler)."""
    try:
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        totals = {}
        for evt in prof.key_averages():
            total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if total:
                totals[evt.key] = total / calls
        with open(os.path.join(out_dir, f"kernels_{name}.txt"), "w") as fh:
            fh.write(json.dumps(totals, indent=1))
        return totals
    except Exception as exc:
        print(f"  profile {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return {}


def print_tables(result, variants, env, bandwidth):
    names = list(variants)
    print("\nper-variant median us, do_bench / graph replay (splits):")
    print("case        " + " ".join(f"{n:>18}" for n in names))
    for c in result["cases"]:
        row = " ".join(f"{c['variants'][n]['us']:7.1f}/{c['variants'][n]['graph_us']:6.1f}({c['variants'][n]['splits']:>3})"
                       for n in names)
        print(f"B{c['batch']:<2} N{c['span']:<7} {row}")
    b1 = next((c for c in result["cases"] if (c["batch"], c["span"]) == (1, 16384)), None)
    if b1:
        print(f"B1 N16k host us/call: {json.dumps(b1['host'])}")
        for v, k in b1["kernels"].items():
            print(f"B1 N16k kernels ({v}), device us/call: " + ", ".join(f"{n[:40]} {t:.1f}" for n, t in k.items()))
    print(f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"copy {bandwidth / 1e12:.2f} TB/s (read + write)")
    print("| case | MB | floor µs | kernel µs | % floor | kernel µs, graph | % floor | best variant µs (graph) "
          "| dense SDPA µs | dense µs, graph | target µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in result["cases"]:
        d = c["variants"]["default"]
        bv = c["variants"][c["best_graph"]]
        target = TARGETS.get((c["batch"], c["span"]))
        if (c["batch"], c["span"]) == (1, 16384):
            target = f"{GRAPH_TARGET_FLOORS * c['floor_us']:.1f} (graph, {GRAPH_TARGET_FLOORS}× floor)"
        print(f"| B{c['batch']} N{c['span'] // 1024}k | {c['bytes'] / 1e6:.0f} | {c['floor_us']:.1f} | "
              f"{d['us']:.1f} | {100 * c['floor_us'] / d['us']:.0f}% | {d['graph_us']:.1f} | "
              f"{100 * c['floor_us'] / d['graph_us']:.0f}% | {bv['graph_us']:.1f} ({c['best_graph']}) | "
              f"{c['dense_us']:.1f} | {c['dense_graph_us']:.1f} | {target if target else '-'} |")


if __name__ == "__main__":
    main()
