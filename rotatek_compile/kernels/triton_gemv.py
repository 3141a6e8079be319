"""Small-batch weight products, in one launch per group that shares its input (``rotatek.grouped_linear``).

    y_i[M, N_i] = x[M, K] · W_iᵀ        for i < len(weights) ≤ 3,  M ≤ 16  (each W_i [N_i, K], as nn.Linear keeps it)

A decode step at batch 1 reads every weight once, so a product's time is its weight bytes over the
bandwidth it reaches. HF's layers run q, k, v (and gate, up) as separate products; the small ones
reach little of it (on an H200, k and v of the 8B shape, 8.4 MB each, at 1.0 TB/s under cuBLAS),
and cuBLAS adds split-K reduction kernels. Here one launch covers the group: program ``p`` owns
``BLOCK_N`` output rows of one matrix (the first ``tiles(N_0)`` programs matrix 0, the next matrix
1, …) and streams their ``BLOCK_N × K`` weights once, in ``BLOCK_K``-wide tiles along the
contiguous dimension. No weight is copied or concatenated: each matrix is read where the model
keeps it. Two kernels, each autotuned per shape:

- ``M = 1`` (:func:`_vector_kernel`): on CUDA cores, ``acc[BLOCK_N, BLOCK_K] += W_tile · x_tile``
  elementwise in fp32, summed along K once at the end; as few as 2 rows per program, so that even
  a 1024-row matrix spreads over every SM;
- ``1 < M ≤ 16`` (:func:`_dot_kernel`): the batch padded to 16 rows so that a tile is a tensor-core
  dot (fp32 accumulation).

Measured by ``benchmarks/gemv_grouping.py`` (``docs/performance.md``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from rotatek_compile.kernels import GEMV_MAX_GROUP as MAX_GROUP
from rotatek_compile.kernels import GEMV_MAX_ROWS as BATCH_TILE  # tl.dot needs 16 rows: the batch is padded up to it
from rotatek_compile.kernels import on_inputs_device
# tl.sum as a tl.reduce combiner, which Triton's CPU interpreter runs however triton was imported
from rotatek_compile.kernels.triton_decode import _add_op


@triton.jit
def _vector_tile(x_ptr, w_ptr, y_ptr, tile, rows_total, depth, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[tile·BLOCK_N : (tile+1)·BLOCK_N] = W[rows] · x`` for one matrix, ``x`` one row."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows (weight rows)
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)  # per-column partial products, summed once
    for k0 in range(0, depth, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=(rows[:, None] < rows_total) & (cols[None, :] < depth), other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + cols, mask=cols < depth, other=0.0)  # [BLOCK_K]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.reduce(acc, 1, _add_op).to(y_ptr.dtype.element_ty), mask=rows < rows_total)


@triton.jit
def _vector_kernel(x_ptr, w0, y0, n0, sw0, w1, y1, n1, sw1, w2, y2, n2, sw2, depth,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tiles0 = (n0 + BLOCK_N - 1) // BLOCK_N
    tiles1 = (n1 + BLOCK_N - 1) // BLOCK_N
    if pid < tiles0:
        _vector_tile(x_ptr, w0, y0, pid, n0, depth, sw0, BLOCK_N, BLOCK_K)
    elif pid < tiles0 + tiles1:
        _vector_tile(x_ptr, w1, y1, pid - tiles0, n1, depth, sw1, BLOCK_N, BLOCK_K)
    else:
        _vector_tile(x_ptr, w2, y2, pid - tiles0 - tiles1, n2, depth, sw2, BLOCK_N, BLOCK_K)


@triton.jit
def _row_tile(x_ptr, w_ptr, y_ptr, tile, batch, rows_total, depth, stride_xb, stride_wn, stride_yb,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[:, tile·BLOCK_N : (tile+1)·BLOCK_N] = x · W[rows]ᵀ`` for one matrix."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows (weight rows)
    b = tl.arange(0, BLOCK_B)  # [BLOCK_B] batch rows
    acc = tl.full((BLOCK_N, BLOCK_B), 0.0, tl.float32)  # tl.full: a builtin the CPU interpreter runs
    for k0 in range(0, depth, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=(rows[:, None] < rows_total) & (cols[None, :] < depth), other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + b[None, :] * stride_xb + cols[:, None],
                    mask=(b[None, :] < batch) & (cols[:, None] < depth), other=0.0)  # [BLOCK_K, BLOCK_B]
        acc = tl.dot(w, x, acc)
    tl.store(y_ptr + b[None, :] * stride_yb + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < rows_total) & (b[None, :] < batch))


@triton.jit
def _dot_kernel(x_ptr, w0, y0, n0, sw0, w1, y1, n1, sw1, w2, y2, n2, sw2, batch, depth, stride_xb,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tiles0 = (n0 + BLOCK_N - 1) // BLOCK_N
    tiles1 = (n1 + BLOCK_N - 1) // BLOCK_N
    if pid < tiles0:
        _row_tile(x_ptr, w0, y0, pid, batch, n0, depth, stride_xb, sw0, n0, BLOCK_B, BLOCK_N, BLOCK_K)
    elif pid < tiles0 + tiles1:
        _row_tile(x_ptr, w1, y1, pid - tiles0, batch, n1, depth, stride_xb, sw1, n1, BLOCK_B, BLOCK_N, BLOCK_K)
    else:
        _row_tile(x_ptr, w2, y2, pid - tiles0 - tiles1, batch, n2, depth, stride_xb, sw2, n2,
                  BLOCK_B, BLOCK_N, BLOCK_K)


def _short_bench(kernel_call, quantiles=None, **_):
    """The autotuner's timing, shorter than Triton's default (tens of configs per shape)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _configs(block_n: tuple, block_k: tuple, stages: tuple, fits) -> list:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n in block_n for k in block_k for w in (4, 8) for s in stages if fits(n, k, w)]


# The vector kernel's fp32 accumulator holds BLOCK_N·BLOCK_K values: at most 64 registers a thread.
_VECTOR_CONFIGS = _configs((2, 4, 8, 16, 32), (256, 512, 1024), (2, 3, 4), lambda n, k, w: n * k <= 64 * 32 * w)
# The dot kernel's weight tiles are staged in shared memory: at most 64 KB a tile.
_DOT_CONFIGS = _configs((16, 32, 64, 128), (128, 256, 512), (2, 3, 5), lambda n, k, w: n * k <= 32768)
_vector_tuned = triton.autotune(configs=_VECTOR_CONFIGS, key=["n0", "n1", "n2", "depth"],
                                do_bench=_short_bench)(_vector_kernel)
_dot_tuned = triton.autotune(configs=_DOT_CONFIGS, key=["batch", "n0", "n1", "n2", "depth"],
                             do_bench=_short_bench)(_dot_kernel)
# True when this module was imported under TRITON_INTERPRET=1 (the kernels then run on CPU tensors).
INTERPRETED = not isinstance(_dot_kernel, triton.runtime.JITFunction)


def supports(x: Tensor, weights: list[Tensor]) -> bool:
    """Whether :func:`grouped_linear_triton` serves ``x`` ``[M, K]`` and ``weights``: M ≤ 16, 1 to 3
    matrices of ``x``'s 16-bit dtype and device, each with unit stride along K (fp32 stays with
    cuBLAS: Triton's dot would round its inputs to TF32)."""
    return (x.dim() == 2 and x.shape[0] <= BATCH_TILE and 1 <= len(weights) <= MAX_GROUP
            and x.dtype in (torch.float16, torch.bfloat16) and x.stride(-1) == 1
            and all(w.dim() == 2 and w.shape[1] == x.shape[1] and w.dtype == x.dtype and w.device == x.device
                    and w.stride(1) == 1 for w in weights))


@on_inputs_device
def grouped_linear_triton(x: Tensor, weights: list[Tensor], tile: Optional[tuple[int, int]] = None) -> list[Tensor]:
    """``[F.linear(x, w) for w in weights]`` in one launch (see :func:`supports`). ``tile``
    ``(BLOCK_N, BLOCK_K)``: autotuned per shape when ``None`` on CUDA (the first call of a shape
    times every config), ``(16, 64)`` under the CPU interpreter; the dot kernel (more than one row
    in ``x``) needs ``BLOCK_N ≥ 16``."""
    if not supports(x, weights) and not (INTERPRETED and x.dtype == torch.float32):
        raise ValueError(f"rotatek grouped_linear: x {tuple(x.shape)} {x.dtype} and {len(weights)} weights "
                         f"{[tuple(w.shape) for w in weights]} are not served by the Triton kernel")
    batch, depth = x.shape
    outputs = [x.new_empty(batch, w.shape[0]) for w in weights]
    padded = list(zip(weights, outputs)) + [(weights[0], outputs[0])] * (MAX_GROUP - len(weights))
    sizes = [w.shape[0] for w in weights] + [0] * (MAX_GROUP - len(weights))
    args = []
    for (w, y), n in zip(padded, sizes):
        args += [w, y, n, w.stride(0)]
    if batch == 1:
        kernel, tuned, constants = _vector_kernel, _vector_tuned, {}
        args += [depth]
    else:
        kernel, tuned, constants = _dot_kernel, _dot_tuned, {"BLOCK_B": BATCH_TILE}
        args += [batch, depth, x.stride(0)]
    if tile is None and x.is_cuda:
        tuned[lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in sizes),)](x, *args, **constants)
    else:
        block_n, block_k = tile or (16, 64)
        kernel[(sum(triton.cdiv(n, block_n) for n in sizes),)](x, *args, **constants, BLOCK_N=block_n, BLOCK_K=block_k)
    return outputs
