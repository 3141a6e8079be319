"""Where the host is against the device at each compression site of a compiled prefill, and which
CUDA calls of the prefill wait for the device.

The compression's groups overlap the prefill only if the host queues the prefill's layers ahead
of the device (``rotatek_compile.prefill``). For each number of pipelined groups, this times one
prefill of a ``30 + N + 30``-token prompt (8B shape, rotatek-static) and records, at each
``rotatek.compress_site`` call, the host's time and the time the device reaches that point (an
event), both from the first site; then it profiles the same prefill and counts the CUDA runtime
calls that may wait for the device (synchronisations, page-locked and device allocations).

    python3 benchmarks/prefill_overlap.py --tokens 16384 --groups 1,4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_decode import COMPRESSING_MODULE, build_model, run_case, set_recipe, static_capacity  # noqa: E402

logger = logging.getLogger("prefill_overlap")

# CUDA runtime calls that may wait for the device
WAITING_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaHostAlloc",
                 "cudaMallocHost", "cudaFreeHost", "cudaHostRegister", "cudaMalloc", "cudaFree", "cudaMemcpy"}


class SiteClock:
    """Records, at each site the prefill run takes, the host's clock and an event on the device."""

    def __init__(self):
        self.marks: list[tuple[int, float, torch.cuda.Event]] = []
        self._take = COMPRESSING_MODULE.PrefillRun.take

    def __enter__(self):
        clock = self

        def take(run, site, *args):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            clock.marks.append((site, time.perf_counter(), event))
            return clock._take(run, site, *args)

        COMPRESSING_MODULE.PrefillRun.take = take
        return self

    def __exit__(self, *exc):
        COMPRESSING_MODULE.PrefillRun.take = self._take

    def rows(self) -> list[dict]:
        """Per site: ms since the first site, on the host and on the device (after a synchronisation)."""
        torch.cuda.synchronize()
        _, host0, device0 = self.marks[0]
        return [dict(site=site, host_ms=1e3 * (host - host0), device_ms=device0.elapsed_time(event))
                for site, host, event in self.marks]


def waiting_calls(run) -> dict[str, int]:
    """How many times ``run()`` makes each of :data:`WAITING_CALLS` (from the profiler's trace)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return {event.key: event.count for event in prof.key_averages() if event.key in WAITING_CALLS}


def sync_sites(run) -> dict[str, int]:
    """Where ``run()`` synchronises with the device, as far as ``torch.cuda.set_sync_debug_mode``
    detects it: the innermost frames of this project or transformers that made each wait, counted."""
    import traceback
    import warnings

    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "rotatek_compile" in f.filename or "transformers" in f.filename or "benchmarks" in f.filename]
        where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1][:3])
        found[where] = found.get(where, 0) + 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # puts showwarning back on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="N, the span's tokens")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--groups", default="1,4", help="values of prefill.PIPELINED_GROUPS")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_overlap.py measures a GPU's timeline: no CUDA device")
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(False, "cuda", torch.bfloat16, args.layers)
    recipe = set_recipe(model, "rotatek-static", argparse.Namespace(key_channels=32, solver="auto"))
    capacity = static_capacity(args.tokens, 2)

    def prefill(steps: int = 1) -> dict:
        return run_case(model, recipe, 1, args.tokens, steps, "cuda", capacity=capacity)

    started = time.perf_counter()
    run_case(model, recipe, 1, 256, 1, "cuda", capacity=capacity)
    run_case(model, recipe, 1, 300, 1, "cuda", capacity=capacity)
    prefill()
    logger.info("compiled in %.0f s", time.perf_counter() - started)
    report = dict(tokens=args.tokens, layers=args.layers, torch=torch.__version__, runs=[])
    default = COMPRESSING_MODULE.PIPELINED_GROUPS
    for groups in [int(g) for g in args.groups.split(",")]:
        COMPRESSING_MODULE.PIPELINED_GROUPS = groups
        try:
            prefill()  # once with this grouping before it is measured
            with SiteClock() as clock:
                row = prefill()
            sites = clock.rows()
            calls = waiting_calls(prefill)
            syncs = sync_sites(prefill)
        finally:
            COMPRESSING_MODULE.PIPELINED_GROUPS = default
        report["runs"].append(dict(groups=groups, prefill_ms=row["prefill_ms"], compression_ms=row["compression_ms"],
                                   sites=sites, waiting_calls=calls, synchronised_at=syncs))
        print(f"pipelined groups {groups}: prefill {row['prefill_ms']:.0f} ms, compression {row['compression_ms']:.1f} ms; "
              f"CUDA calls that may wait: {calls}")
        for where, count in sorted(syncs.items(), key=lambda item: -item[1]):
            print(f"  {count:>4} synchronisations at {where}")
        print("  site  host ms  device ms")
        for site in sites[:: max(1, len(sites) // 8)] + sites[-1:]:
            print(f"  {site['site']:>4} {site['host_ms']:>8.1f} {site['device_ms']:>10.1f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_overlap.json"), "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
