"""Candidate: the repository's dot kernel with a wider autotune space (BLOCK_N up to 128, BLOCK_K
128-512, 2-5 stages), short autotune benchmarks."""
import triton
import triton.testing
from rotatek_compile.kernels import triton_gemv as base

_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n in (16, 32, 64, 128) for k in (128, 256, 512) for w in (4, 8) for s in (2, 3, 5)
            if n * k <= 32768]


def _bench(fn, quantiles=None, **_):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_tuned = triton.autotune(configs=_CONFIGS, key=["batch", "n0", "n1", "n2", "depth"], do_bench=_bench)(
    base._grouped_kernel)


def grouped_linear_triton(x, weights):
    batch, depth = x.shape
    outputs = [x.new_empty(batch, w.shape[0]) for w in weights]
    padded = list(zip(weights, outputs)) + [(weights[0], outputs[0])] * (3 - len(weights))
    sizes = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    args = []
    for (w, y), n in zip(padded, sizes):
        args += [w, y, n, w.stride(0)]
    args += [batch, depth, x.stride(0)]
    _tuned[lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in sizes),)](x, *args, BLOCK_B=16)
    return outputs


import atexit  # noqa: E402
atexit.register(lambda: print("wip/gemv_wide.py best configs:", {k: str(c) for k, c in _tuned .cache.items()}))
