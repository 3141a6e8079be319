"""What building one layer's compressed cache costs after prefill, by step and by solver.

    python benchmarks/compress_cost.py --out $OUT          # GPU: 8B-shaped layer, bf16
    python benchmarks/compress_cost.py --lengths 512 --reps 2   # CPU smoke run
    python benchmarks/compress_cost.py --lengths 16384 --profile --out $OUT   # + where the time goes

One decoder layer of the 8B shape (Hq 32, H 8, d 128, r 32, W 32) with a span of ``N`` tokens:
``compress_layer`` (the product's prefill-time work per layer) timed whole, and its steps timed
alone: token gathers, query norms + covariance, the basis solver (``eigh`` and ``subspace``),
``K̃ = K R``; then what the prefill runs, ``compress_layers`` over ``--layers`` such layers (one
batched basis solve), next to as many separate ``compress_layer`` calls and to ``compress_layers``
with ``kernel="reference"`` (on a GPU: the eager window shares and covariances instead of the fused
Triton kernels). Also how close the subspace basis is to the exact one (the share of the weighted
covariance's top-r energy it captures). JSON goes to ``--out``; a table is printed. ``--profile``
adds the profiler's view of one ``compress_layers`` call (host time per op, device kernel time,
host synchronisations, and each step's host and device time) to the log and
``compress_profile.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rotatek_compile import RotateKConfig, state, tiers  # noqa: E402
from rotatek_compile.kernels import reference  # noqa: E402

try:
    from rotatek_compile.kernels import triton_compress  # the fused statistics, on a GPU
except ImportError:
    triton_compress = None
from rotatek_compile.state import LayerPrefill, compress_layer, compress_layers  # noqa: E402

logger = logging.getLogger("compress_cost")
Q_HEADS, KV_HEADS, DIM, RANK, WINDOW = 32, 8, 128, 32, 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def layer_inputs(length: int, device: torch.device, dtype: torch.dtype, batch: int = 1, seed: int = 0) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    total = length + WINDOW
    keys = torch.randn(batch, KV_HEADS, total, DIM, device=device, dtype=dtype, generator=generator)
    keys[..., :DIM // 4] *= 4  # a few dominant channels, as real Keys have
    values = torch.randn(batch, KV_HEADS, total, DIM, device=device, dtype=dtype, generator=generator)
    queries = torch.randn(batch, Q_HEADS, WINDOW, DIM, device=device, dtype=dtype, generator=generator)
    span = torch.zeros(batch, total, dtype=torch.bool, device=device)
    span[:, :length] = True
    valid = torch.ones_like(span)
    return dict(keys=keys, values=values, queries=queries, span=span, valid=valid)


def captured_energy(covariance: torch.Tensor, basis: torch.Tensor, exact: torch.Tensor) -> float:
    """``tr(Rᵀ C R) / tr(R*ᵀ C R*)``, worst head: 1 when the basis spans the exact top-r subspace."""
    def energy(r):
        return (r.transpose(-1, -2) @ covariance @ r).diagonal(dim1=-2, dim2=-1).sum(-1)

    return float((energy(basis) / energy(exact)).min())


def measure(length: int, device: torch.device, dtype: torch.dtype, reps: int, layers: int, batch: int = 1,
            query_aware: bool | str = "auto") -> dict:
    inputs = layer_inputs(length, device, dtype, batch)
    row: dict = {"tokens": length, "batch": batch, "layers": layers}
    for solver in ("eigh", "subspace"):
        config = RotateKConfig(key_channels=RANK, span="prompt", query_window=WINDOW, solver=solver,
                               query_aware=query_aware)
        row[f"compress_layer_{solver}_ms"] = median_ms(
            lambda: compress_layer(**inputs, config=config, scale=DIM ** -0.5), device, reps)
    config = RotateKConfig(key_channels=RANK, span="prompt", query_window=WINDOW,  # the default solver
                           query_aware=query_aware)
    # every layer its own Keys, as in a model (the same tensor for all would be read from L2)
    stack = [inputs] + [layer_inputs(length, device, dtype, batch, seed) for seed in range(1, layers)]
    row["separate_layers_ms"] = median_ms(
        lambda: [compress_layer(**layer, config=config, scale=DIM ** -0.5) for layer in stack], device, reps)
    row["compress_layers_ms"] = median_ms(lambda: list(compress_layers(
        [LayerPrefill(**layer, scale=DIM ** -0.5) for layer in stack], config)), device, reps)
    # the same with the eager window shares and covariances (on a GPU; on CPU both are the reference)
    eager = dataclasses.replace(config, kernel="reference")
    row["compress_layers_reference_ms"] = median_ms(lambda: list(compress_layers(
        [LayerPrefill(**layer, scale=DIM ** -0.5) for layer in stack], eager)), device, reps)
    del stack
    span_keys = inputs["keys"][:, :, :length]
    positions = torch.arange(length, device=device)[None, :].expand(batch, -1)
    index = positions[:, None, :, None].expand(-1, KV_HEADS, -1, DIM)
    row["gather_span_kv_ms"] = median_ms(
        lambda: (inputs["keys"].gather(2, index), inputs["values"].gather(2, index)), device, reps)
    norms = reference.query_channel_norms(inputs["queries"], KV_HEADS)
    row["covariance_ms"] = median_ms(lambda: reference.span_covariance(span_keys, None, norms), device, reps)
    covariance, mean = reference.span_covariance(span_keys, None, norms)
    row["eigh_ms"] = median_ms(lambda: reference.top_eigenvectors(covariance, RANK), device, reps)
    row["subspace_ms"] = median_ms(lambda: reference.subspace_iteration(covariance, RANK), device, reps)
    exact = reference.top_eigenvectors(covariance, RANK)
    row["subspace_energy_vs_exact"] = captured_energy(covariance, reference.subspace_iteration(covariance, RANK), exact)
    row["project_ms"] = median_ms(lambda: reference.compress_span(span_keys, exact, mean), device, reps)
    row.update(window_attention_ms(inputs, length, device, reps))
    return row


def window_attention_ms(inputs: dict, length: int, device: torch.device, reps: int) -> dict:
    """The half window's grouped queries (``[B, H, G·W/2, d]``) attending over the span, by SDPA
    backend, with and without a padding mask, at full width and at ``r`` channels: the basis
    choice runs three such attentions per layer (as one call, with ``qR`` and ``kR`` zero-padded to
    ``d``: flash attention takes only equal head dims, so its ``r`` cells are empty)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    keys, values = inputs["keys"][:, :, :length], inputs["values"][:, :, :length]
    batch = keys.shape[0]
    q = inputs["queries"][:, :, WINDOW // 2:].reshape(batch, KV_HEADS, -1, DIM)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=device)
    side = torch.randn(batch, KV_HEADS, DIM, 2 * RANK, device=device, dtype=keys.dtype)
    q_side, k_side = q @ side, keys @ side
    row = {}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH, "default": None}
    for name, backend in backends.items():
        for masked in (False, True):
            for width, (qq, kk) in (("d", (q, keys)), ("r", (q_side[..., :RANK], k_side[..., :RANK]))):
                key = f"attention_{name}_{width}{'_masked' if masked else ''}_ms"

                def attend():
                    return torch.nn.functional.scaled_dot_product_attention(
                        qq, kk, values, attn_mask=mask if masked else None, scale=DIM ** -0.5)
                try:
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        row[key] = median_ms(attend, device, reps)
                except RuntimeError:
                    row[key] = None
    return row


def profile_compress_layers(length: int, device: torch.device, dtype: torch.dtype, layers: int,
                            batch: int = 1, query_aware: bool | str = "auto") -> str:
    """The profiler's table of one ``compress_layers`` call over ``layers`` layers, and its totals."""
    stack = [layer_inputs(length, device, dtype, batch, seed) for seed in range(layers)]
    config = RotateKConfig(key_channels=RANK, span="prompt", query_window=WINDOW, query_aware=query_aware)

    def run():
        list(compress_layers([LayerPrefill(**layer, scale=DIM ** -0.5) for layer in stack], config))

    run()  # warm-up
    with phases_marked():
        return profile_table(run, device, f"compress_layers, {layers} layers of {batch} x {length} tokens")


# The steps of ``compress_layers`` whose host and device time the profile reports (inclusive: a
# step called inside another counts in both).
PHASES = ((state, "_window_shares"), (tiers, "sinks_by_share"), (state, "_true_first"),
          (state, "_gather_positions"), (reference, "span_covariance"), (reference, "weight_covariance"),
          (reference, "solve_basis"), (reference, "basis_attention_error"), (reference, "stored_basis"),
          (state, "_build_layer"), (reference, "project_span"))
# ... and on a GPU, the fused covariances (in place of ``span_covariance``)
FUSED_PHASES = ((triton_compress, "span_covariances_triton"),) if triton_compress is not None else ()


@contextlib.contextmanager
def phases_marked():
    """Each function of :data:`PHASES` (and :data:`FUSED_PHASES`) runs inside a profiler range named
    ``phase:<name>``."""
    originals = [(module, name, getattr(module, name)) for module, name in PHASES + FUSED_PHASES]

    def marked(name, function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"phase:{name}"):
                return function(*args, **kwargs)
        return run

    for module, name, function in originals:
        setattr(module, name, marked(name, function))
    try:
        yield
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


def _inside_aten(event) -> bool:
    """Whether a profiler event runs inside an aten call (not one the Python code made itself)."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent is not None


def profile_table(run, device: torch.device, what: str) -> str:
    """``run()`` under the profiler (with the device's kernels on a GPU): a line of totals (top-level
    aten calls, host synchronisations, device kernel time), then the ops by host time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
        _sync(device)
    events = prof.key_averages()
    # a host read of a device value: item() / bool(), or tolist() (a synchronising copy on CUDA)
    syncs = sum(e.count for e in events if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize"))
    top_level = sum(1 for e in prof.events() if e.name.startswith("aten::") and not _inside_aten(e))
    device_us = sum(e.self_device_time_total for e in events  # kernels, not the steps' ranges on the GPU timeline
                    if e.device_type != torch.autograd.DeviceType.CPU and not e.key.startswith("phase:"))
    header = (f"{what}: {top_level} top-level aten calls, {syncs} host synchronisations, "
              f"device kernel time {device_us / 1e3:.1f} ms")
    marked = [e for e in events if e.key.startswith("phase:") and e.device_type == torch.autograd.DeviceType.CPU]
    phase_lines = [f"{'step (inclusive)':<28} {'calls':>6} {'host ms':>9} {'device ms':>10}"] + [
        f"{e.key[6:]:<28} {e.count:>6} {e.cpu_time_total / 1e3:>9.2f} {e.device_time_total / 1e3:>10.2f}"
        for e in sorted(marked, key=lambda e: -e.cpu_time_total)]
    table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    return "\n".join([header, *phase_lines, table]) if marked else header + "\n" + table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=32, help="layers compressed by one compress_layers call")
    parser.add_argument("--batch", type=int, default=1, help="prompts per layer")
    parser.add_argument("--query-aware", choices=["auto", "true", "false"], default="auto",
                        help="the basis (RotateKConfig.query_aware)")
    parser.add_argument("--out", default=None, help="folder for compress_cost.json")
    parser.add_argument("--profile", action="store_true", help="profile one compress_layers call per length")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    query_aware = {"auto": "auto", "true": True, "false": False}[args.query_aware]
    rows = [measure(int(n), device, dtype, args.reps, args.layers, args.batch, query_aware)
            for n in args.lengths.split(",")]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    keys = ["compress_layer_eigh_ms", "compress_layer_subspace_ms", "gather_span_kv_ms", "covariance_ms",
            "eigh_ms", "subspace_ms", "project_ms", "subspace_energy_vs_exact", "separate_layers_ms",
            "compress_layers_ms", "compress_layers_reference_ms"]
    logger.info("%s, %s, one layer (B %d, H %d, d %d, r %d), query_aware=%s, ms (median of %d); the last three: "
                "%d layers", device_name, dtype, args.batch, KV_HEADS, DIM, RANK, query_aware, args.reps, args.layers)
    logger.info("%8s " + " ".join(f"{k[:-3] if k.endswith('_ms') else k:>26}" for k in keys), "N")
    for row in rows:
        logger.info("%8d " + " ".join(f"{row[k]:>26.3f}" for k in keys), row["tokens"])
        logger.info("window attention ms: %s", {k[10:-3]: None if v is None else round(v, 3)
                                                for k, v in row.items() if k.startswith("attention_")})
    profiles = [profile_compress_layers(int(n), device, dtype, args.layers, args.batch, query_aware)
                for n in args.lengths.split(",")] if args.profile else []
    for text in profiles:
        logger.info("%s", text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        if profiles:
            with open(os.path.join(args.out, "compress_profile.txt"), "w") as f:
                f.write("\n\n".join(profiles))
        with open(os.path.join(args.out, "compress_cost.json"), "w") as f:
            json.dump({"device": device_name, "dtype": str(dtype), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
