"""Candidate: batch 1 on CUDA cores (each program BLOCK_N rows, an fp32 [BLOCK_N, BLOCK_K] partial
product summed once at the end, no padding of the batch to 16); batches above 1 the dot kernel."""
import triton
import triton.language as tl
import triton.testing
from rotatek_compile.kernels import triton_gemv as base

_add_op = getattr(tl.standard, "_sum_combine", None)


@triton.jit
def _row_tile_1(x_ptr, w_ptr, y_ptr, tile, rows_total, depth, stride_wn,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=(rows[:, None] < rows_total) & (cols[None, :] < depth), other=0.0)
        x = tl.load(x_ptr + cols, mask=cols < depth, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.reduce(acc, 1, _add_op).to(y_ptr.dtype.element_ty), mask=rows < rows_total)


@triton.jit
def _kernel_1(x_ptr, w0, y0, n0, sw0, w1, y1, n1, sw1, w2, y2, n2, sw2, depth,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tiles0 = (n0 + BLOCK_N - 1) // BLOCK_N
    tiles1 = (n1 + BLOCK_N - 1) // BLOCK_N
    if pid < tiles0:
        _row_tile_1(x_ptr, w0, y0, pid, n0, depth, sw0, BLOCK_N, BLOCK_K)
    elif pid < tiles0 + tiles1:
        _row_tile_1(x_ptr, w1, y1, pid - tiles0, n1, depth, sw1, BLOCK_N, BLOCK_K)
    else:
        _row_tile_1(x_ptr, w2, y2, pid - tiles0 - tiles1, n2, depth, sw2, BLOCK_N, BLOCK_K)


def _bench(fn, quantiles=None, **_):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n in (2, 4, 8, 16, 32) for k in (256, 512, 1024) for w in (4, 8) for s in (2, 3, 4)
            if n * k <= 4096 * w]
_tuned_1 = triton.autotune(configs=_CONFIGS, key=["n0", "n1", "n2", "depth"], do_bench=_bench)(_kernel_1)


def grouped_linear_triton(x, weights):
    batch, depth = x.shape
    if batch != 1:
        return base.grouped_linear_triton(x, weights)
    outputs = [x.new_empty(batch, w.shape[0]) for w in weights]
    padded = list(zip(weights, outputs)) + [(weights[0], outputs[0])] * (3 - len(weights))
    sizes = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    args = []
    for (w, y), n in zip(padded, sizes):
        args += [w, y, n, w.stride(0)]
    _tuned_1[lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in sizes),)](x, *args, depth)
    return outputs


import atexit  # noqa: E402
atexit.register(lambda: print("wip/gemv_rows.py best configs:", {k: str(c) for k, c in _tuned_1 .cache.items()}))
