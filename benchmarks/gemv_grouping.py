"""A decoder layer's weight products at small batch: as HF runs them, grouped, and by rotatek's kernel.

    python benchmarks/gemv_grouping.py --out $OUT     # GPU: the 8B shape, batch 1 and 8
    python benchmarks/gemv_grouping.py --tiny         # CPU smoke run of the same code

A decode step reads every weight once, so at batch 1 a product's time is its weight bytes over the
bandwidth it reaches. HF's Llama layer runs seven products (q, k, v from the normed hidden state;
o; gate, up from the second norm; down), and the small ones reach less of the bandwidth: k and v
are 8 MB each at the 8B shape, and cuBLAS gives some products a split-K reduction kernel of their
own. Grouped, ``q|k|v`` is one ``[6144, 4096]`` product and ``gate|up`` one ``[28672, 4096]``:
four products per layer, the same bytes. ``rotatek.grouped_linear``'s Triton kernel
(:mod:`rotatek_compile.kernels.triton_gemv`) runs each group in one launch without concatenating
the weights.

Per batch size this times, under CUDA-graph replay over ``--layers`` distinct layers' weights (far
more than the L2 cache holds), each product alone and the three ways of running a whole layer's
products (µs per layer, TB/s of weight bytes, kernels per layer), against the layer's byte floor at
the copy bandwidth measured in the same run. Every way's outputs are checked against the separate
products'. JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
logger = logging.getLogger("gemv_grouping")


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    q_out: int  # query heads × head dim
    kv_out: int  # KV heads × head dim
    intermediate: int


LLAMA_8B = Shape(hidden=4096, q_out=4096, kv_out=1024, intermediate=14336)
TINY = Shape(hidden=64, q_out=64, kv_out=16, intermediate=224)


class LayerWeights:
    """One layer's weights, stored grouped (``q|k|v``, ``gate|up``); the separate weights are row
    slices of them, so both ways read the same memory and no weight is stored twice."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: str, generator: torch.Generator):
        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, generator=generator, device=device, dtype=dtype) / cols ** 0.5

        s = shape
        self.qkv = weight(s.q_out + 2 * s.kv_out, s.hidden)  # [q_out + 2·kv_out, hidden]
        self.o = weight(s.hidden, s.q_out)
        self.gate_up = weight(2 * s.intermediate, s.hidden)  # [2·intermediate, hidden]
        self.down = weight(s.hidden, s.intermediate)
        self.q, self.k, self.v = self.qkv.split([s.q_out, s.kv_out, s.kv_out])
        self.gate, self.up = self.gate_up.split([s.intermediate, s.intermediate])
        self.shape = s

    def bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.qkv, self.o, self.gate_up, self.down))


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GroupedLinear = Callable[[torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]


def separate(layer: LayerWeights, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF's seven products; ``x`` ``[B, hidden]``. (No norm or activation: the products alone.)"""
    q, k, v = F.linear(x, layer.q), F.linear(x, layer.k), F.linear(x, layer.v)
    o = F.linear(q, layer.o)
    gate, up = F.linear(x, layer.gate), F.linear(x, layer.up)
    return {"q": q, "k": k, "v": v, "o": o, "gate": gate, "up": up, "down": F.linear(gate, layer.down)}


def grouped(layer: LayerWeights, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same products, ``q|k|v`` and ``gate|up`` as one each: four per layer."""
    s = layer.shape
    q, k, v = F.linear(x, layer.qkv).split([s.q_out, s.kv_out, s.kv_out], dim=-1)
    gate, up = F.linear(x, layer.gate_up).split([s.intermediate, s.intermediate], dim=-1)
    return {"q": q, "k": k, "v": v, "o": F.linear(q, layer.o), "gate": gate, "up": up,
            "down": F.linear(gate, layer.down)}


def one_product(name: str, linear: Linear = F.linear) -> Callable[[LayerWeights, dict[int, torch.Tensor]], torch.Tensor]:
    """A single product of a layer; ``inputs`` maps an input width to a ``[B, width]`` input."""
    def run(layer: LayerWeights, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        weight = getattr(layer, name)
        return linear(inputs[weight.shape[1]], weight)
    return run


PRODUCTS = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")


def _time_ms(fn: Callable[[], object], device: str, repeats: int, graph: bool = True) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph (on CUDA; ``graph=False``: launched from the
    stream) or called (on CPU)."""
    if device != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: cuBLAS picks and caches its kernels before capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        run = captured.replay
    warm_until = time.perf_counter() + 0.2  # runs for 0.2 s first: an idle GPU clocks up over ~0.1 s
    while time.perf_counter() < warm_until:
        run()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def _kernels(fn: Callable[[], object]) -> list[str]:
    """Names of the device kernels one call of ``fn`` launches (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]


def copy_bandwidth(device: str, nbytes: int) -> tuple[float, float]:
    """Device-to-device copy bandwidth, bytes/s (read + write): launched from the stream (the figure
    the project's byte floors use, ~4.3 TB/s on the H200), and captured in a CUDA graph, where the
    copy becomes a memcpy node (~2.7 TB/s there)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    rate = lambda ms: 2 * src.numel() * src.element_size() / (ms * 1e-3)  # noqa: E731
    return (rate(_time_ms(lambda: dst.copy_(src), device, 20, graph=False)),
            rate(_time_ms(lambda: dst.copy_(src), device, 20)))


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp_min(1e-30))
               for k in a)


def with_kernel(layer: LayerWeights, x: torch.Tensor, kernel: GroupedLinear) -> dict[str, torch.Tensor]:
    """The layer's products as ``rotatek.grouped_linear`` runs them: q, k, v in one launch and gate,
    up in another, each matrix read where it lies (no concatenation); o and down one launch each."""
    q, k, v = kernel(x, [layer.q, layer.k, layer.v])
    gate, up = kernel(x, [layer.gate, layer.up])
    return {"q": q, "k": k, "v": v, "o": kernel(q, [layer.o])[0], "gate": gate, "up": up,
            "down": kernel(gate, [layer.down])[0]}


def measure(shape: Shape, batches: list[int], layers: int, dtype: torch.dtype, device: str, repeats: int,
            copy_bytes: int, kernels: Optional[dict[str, GroupedLinear]] = None) -> dict:
    """Every row of the table; ``kernels``: grouped product kernels to time beside ``F.linear``, by
    label (``"kernel"``: :func:`rotatek_compile.kernels.triton_gemv.grouped_linear_triton`)."""
    generator = torch.Generator(device).manual_seed(0)
    weights = [LayerWeights(shape, dtype, device, generator) for _ in range(layers)]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    layer_bytes = weights[0].bytes()
    bandwidth, graph_bandwidth = copy_bandwidth(device, copy_bytes)
    logger.info("copy bandwidth %.2f TB/s from the stream, %.2f TB/s as a CUDA-graph node; %d layers of %.1f MB",
                bandwidth / 1e12, graph_bandwidth / 1e12, layers, layer_bytes / 1e6)
    single = "cuBLAS" if device == "cuda" else "F.linear"
    rows = []
    for batch in batches:
        inputs = {width: torch.randn(batch, width, generator=generator, device=device, dtype=dtype)
                  for width in {shape.hidden, shape.q_out, shape.intermediate}}
        x = inputs[shape.hidden]
        products = [(name, name, one_product(name)) for name in PRODUCTS]
        ways = [("layer, separate", lambda w: separate(w, x)), ("layer, grouped", lambda w: grouped(w, x))]
        for label, kernel in (kernels or {}).items():
            products += [(f"{name} ({label})", name,
                          one_product(name, lambda a, w, kernel=kernel: kernel(a, [w])[0]))
                         for name in ("q", "k", "v", "o", "gate", "up", "down")]
            products += [(f"{name} ({label}, one launch)", name,
                          lambda layer, given, parts=parts, kernel=kernel:
                          kernel(given[shape.hidden], [getattr(layer, p) for p in parts]))
                         for name, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up")))]
            ways.append((f"layer, grouped ({label})", lambda w, kernel=kernel: with_kernel(w, x, kernel)))
        reference = [separate(w, x) for w in weights]
        for what, weight_name, product in products:
            ms = _time_ms(lambda: [product(w, inputs) for w in weights], device, repeats)
            nbytes = getattr(weights[0], weight_name).numel() * getattr(weights[0], weight_name).element_size()
            rows.append({"batch": batch, "what": what, "us_per_layer": ms * 1e3 / layers, "weight_bytes": nbytes,
                         "tb_per_s": nbytes * layers / (ms * 1e-3) / 1e12, "floor_us": nbytes / bandwidth * 1e6})
        for what, way in ways:
            error = max(max_relative_error(want, way(w)) for w, want in zip(weights, reference))
            logger.info("B%d %s: outputs vs %s separate ones, max relative error %.1e (%s)", batch, what, single,
                        error, "ok" if error <= tolerance else f"ABOVE {tolerance:g}")
            ms = _time_ms(lambda: [way(w) for w in weights], device, repeats)
            launched = _kernels(lambda: [way(w) for w in weights]) if device == "cuda" else []
            rows.append({"batch": batch, "what": what, "us_per_layer": ms * 1e3 / layers,
                         "weight_bytes": layer_bytes, "tb_per_s": layer_bytes * layers / (ms * 1e-3) / 1e12,
                         "floor_us": layer_bytes / bandwidth * 1e6,
                         "kernels_per_layer": len(launched) / layers if launched else None,
                         "kernel_names": sorted(set(launched)), "max_relative_error": error})
    return {"shape": dataclasses.asdict(shape), "dtype": str(dtype), "layers": layers,
            "copy_bandwidth_tb_per_s": bandwidth / 1e12, "copy_bandwidth_graph_tb_per_s": graph_bandwidth / 1e12,
            "rows": rows}


def table(result: dict) -> str:
    lines = ["| B | what | µs per layer | weight MB | TB/s | × floor | kernels per layer |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = f"{row['us_per_layer'] / row['floor_us']:.2f}"
        kernels = row.get("kernels_per_layer")
        lines.append(f"| {row['batch']} | {row['what']} | {row['us_per_layer']:.1f} | {row['weight_bytes'] / 1e6:.1f} | "
                     f"{row['tb_per_s']:.2f} | {ratio} | {'-' if kernels is None else f'{kernels:g}'} |")
    return "\n".join(lines)


def _load(path: str):
    """The module at ``path`` (a candidate kernel file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, float32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layers", type=int, default=8, help="distinct layers' weights (8 B-shape layers: 3.5 GB)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-kernel", action="store_true",
                        help="F.linear alone (default: rotatek.grouped_linear's Triton kernel too, on CUDA or under "
                             "TRITON_INTERPRET=1)")
    parser.add_argument("--candidates", default="",
                        help="LABEL=FILE,...: other modules defining grouped_linear_triton(x, weights), timed beside "
                             "the kernel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    kernels = {}
    if not args.no_kernel and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        from rotatek_compile.kernels.triton_gemv import grouped_linear_triton
        kernels["kernel"] = grouped_linear_triton
    for label, path in (item.split("=", 1) for item in args.candidates.split(",") if item):
        kernels[label] = _load(path).grouped_linear_triton
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        result = measure(TINY, batches, 2, torch.float32, "cpu", 3, 1 << 20, kernels)
    else:
        if device != "cuda":
            parser.error("no CUDA device: pass --tiny for the CPU smoke run")
        result = measure(LLAMA_8B, batches, args.layers, torch.bfloat16, device, args.repeats, 1 << 30, kernels)
    result.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)
    print(table(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv_grouping.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
