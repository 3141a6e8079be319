"""Fused Triton kernels of the compression after the prefill: window shares and span covariance.

Both are memory-bound statistics of one layer's Keys, which the eager forms compute in several
passes over ``[B, H, ·, S]`` temporaries; here each kernel reads the Keys once. Eager twins and
oracles: :func:`rotatek_compile.tiers.window_share` and
:func:`rotatek_compile.kernels.reference.span_covariance` (CPU path, and the GPU path without
triton). Shapes (``G = Hq // H`` query heads per KV head, ``M = G·W`` window rows per KV head)::

    window_share:    queries [B, H, M, d], keys [B, H, S, d], span [B, S] bool → share [B, H, S] fp32
        p[m, s] = exp(scale·q_m·k_s − lse_m),  lse_m = log Σ_{s' in span} exp(scale·q_m·k_s')
        share[s] = (1/M) Σ_m p[m, s]   for s in the span, 0 elsewhere
    span_covariance: keys [B, H, S, d], mask [B, S] or [B, H, S] bool → C [B, H, d, d], μ [B, H, d] fp32
        μ = mean of the masked Keys;  μ' = μ rounded to the Keys' dtype
        C = Σ_s w_s (k_s − μ')(k_s − μ')ᵀ − n (μ' − μ)(μ' − μ)ᵀ      (centred in the Keys' dtype)

The window share's eager form writes the ``[B, H, M, S]`` fp32 logits and reads them back four
times (134 MB a layer at 16k tokens, against the Keys' 34 MB); here the logits never leave
registers. Two launches: ``_chunk_statistics_kernel`` (grid ``(chunks, row blocks, B·H)``) keeps
an online max and sum of ``exp2`` over one chunk of Keys per query row; ``_share_kernel`` (grid
``(Key blocks, B·H)``) combines the chunks into each row's ``lse`` and sums ``exp2(s − lse)`` over
the rows. The covariance's ``_centred_gram_kernel`` (grid ``(chunks, B·H)``) accumulates one
chunk's ``xxᵀ``, ``x = w·(k − μ')`` rounded to the Keys' dtype as the eager form does, on tensor
cores into fp32; the chunks' partial sums are added in a fixed order (deterministic).

Logits and sums are fp32 (half-precision dots accumulate in fp32; fp32 inputs use exact fp32
dots). A row without span tokens gets share 0 everywhere, and ``C = 0``, ``μ = 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rotatek_compile.kernels import reference
# tl.max / tl.sum as tl.reduce combiners, which Triton's CPU interpreter runs however triton was imported
from rotatek_compile.kernels.triton_decode import _add_op, _max_op

_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every dimension ≥ 16
BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # Keys per tile
# Programs a launch aims for (a few waves on a large GPU): sets the chunks per (row block, B·H).
TARGET_PROGRAMS = 512
# The covariance's programs: each chunk writes a [d, d] fp32 partial sum, so fewer of them.
GRAM_PROGRAMS = 256
GRAM_BLOCK_N = 64


@triton.jit
def _chunk_statistics_kernel(
    q, k, span, part_max, part_sum,
    M, S, H, qk_scale, blocks_per_chunk, chunks,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_sb, s_ss,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    row_block = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_tile = tl.load(q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :] * s_qd,
                     mask=(rows < M)[:, None] & (dims < D)[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    row_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
    row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    for j in range(0, blocks_per_chunk):
        cols = (chunk * blocks_per_chunk + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_tile = tl.load(k + b * s_kb + h * s_kh + cols[None, :] * s_ks + dims[:, None] * s_kd,
                         mask=(cols < S)[None, :] & (dims < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        real = tl.load(span + b * s_sb + cols * s_ss, mask=cols < S, other=0) != 0
        s = tl.dot(q_tile, k_tile, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
        s = tl.where(real[None, :], s, -float("inf"))
        new_max = tl.maximum(row_max, tl.reduce(s, 1, _max_op))
        finite_max = tl.where(new_max == -float("inf"), 0.0, new_max)  # a row with no real Key yet
        row_sum = row_sum * tl.exp2(row_max - finite_max) + tl.reduce(tl.exp2(s - finite_max[:, None]), 1, _add_op)
        row_max = new_max
    out = (bh * chunks + chunk) * M + rows
    tl.store(part_max + out, row_max, mask=rows < M)
    tl.store(part_sum + out, row_sum, mask=rows < M)


@triton.jit
def _share_kernel(
    q, k, span, part_max, part_sum, share,
    M, S, H, qk_scale, chunks,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_sb, s_ss,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    key_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_tile = tl.load(k + b * s_kb + h * s_kh + cols[None, :] * s_ks + dims[:, None] * s_kd,
                     mask=(cols < S)[None, :] & (dims < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    real = tl.load(span + b * s_sb + cols * s_ss, mask=cols < S, other=0) != 0
    total = tl.full([BLOCK_N], 0.0, tl.float32)
    for row_start in range(0, M, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        in_rows = rows < M
        # lse of each row from the chunks' (max, sum): max over chunks, then the rescaled sums.
        row_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
        for c in range(0, chunks):
            row_max = tl.maximum(row_max, tl.load(part_max + (bh * chunks + c) * M + rows, mask=in_rows,
                                                  other=-float("inf")))
        finite_max = tl.where(row_max == -float("inf"), 0.0, row_max)
        row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
        for c in range(0, chunks):
            at = (bh * chunks + c) * M + rows
            row_sum += tl.load(part_sum + at, mask=in_rows, other=0.0) * tl.exp2(
                tl.load(part_max + at, mask=in_rows, other=-float("inf")) - finite_max)
        lse = finite_max + tl.log2(tl.maximum(row_sum, 1e-30))
        q_tile = tl.load(q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :] * s_qd,
                         mask=in_rows[:, None] & (dims < D)[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        s = tl.dot(q_tile, k_tile, input_precision=DOT_PREC) * qk_scale
        p = tl.where(in_rows[:, None] & real[None, :], tl.exp2(s - lse[:, None]), 0.0)
        total += tl.reduce(p, 0, _add_op)
    tl.store(share + bh * S + cols, total / M, mask=cols < S)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands heed it


def _chunking(blocks: int, programs_per_chunk: int, target: int) -> tuple[int, int]:
    """``(chunks, blocks per chunk)``: about ``target`` programs in all, every chunk non-empty."""
    chunks = max(1, min(blocks, target // max(programs_per_chunk, 1)))
    per_chunk = triton.cdiv(blocks, chunks)
    return triton.cdiv(blocks, per_chunk), per_chunk


def window_share_triton(queries: Tensor, keys: Tensor, scale: float, span: Tensor) -> Tensor:
    """``queries`` ``[B, Hq, W, d]``, ``keys`` ``[B, H, S, d]``, ``span`` ``[B, S]`` bool →
    ``[B, H, S]`` fp32 (see the module docstring); the same as :func:`rotatek_compile.tiers.window_share`."""
    batch, kv_heads, length, dim = keys.shape
    q = queries.to(keys.dtype).reshape(batch, kv_heads, -1, dim)  # [B, H, M, d]: each group's rows
    rows = q.shape[2]
    share = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
    if batch * kv_heads * length * rows == 0:
        return share
    mask = span.to(torch.int8)
    row_blocks = triton.cdiv(rows, BLOCK_M)
    key_blocks = triton.cdiv(length, BLOCK_N)
    chunks, blocks_per_chunk = _chunking(key_blocks, row_blocks * batch * kv_heads, TARGET_PROGRAMS)
    part_max = torch.empty(batch * kv_heads, chunks, rows, dtype=torch.float32, device=keys.device)
    part_sum = torch.empty_like(part_max)
    common = dict(D=dim, BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(dim)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  DOT_PREC=_dot_precision(keys.dtype))
    strides = (*q.stride(), *keys.stride(), *mask.stride())
    qk_scale = scale * _LOG2E
    _chunk_statistics_kernel[(chunks, row_blocks, batch * kv_heads)](
        q, keys, mask, part_max, part_sum, rows, length, kv_heads, qk_scale, blocks_per_chunk, chunks,
        *strides, **common)
    _share_kernel[(key_blocks, batch * kv_heads)](
        q, keys, mask, part_max, part_sum, share, rows, length, kv_heads, qk_scale, chunks, *strides, **common)
    return share


@triton.jit
def _centred_gram_kernel(
    k, mask, shift, part, S, H, blocks_per_chunk, chunks,
    s_kb, s_kh, s_ks, s_kd,
    s_mb, s_mh, s_ms,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    dims = tl.arange(0, BLOCK_D)
    centre = tl.load(shift + bh * D + dims, mask=dims < D, other=0.0).to(tl.float32)  # μ' [BLOCK_D]
    acc = tl.full([BLOCK_D, BLOCK_D], 0.0, tl.float32)
    for j in range(0, blocks_per_chunk):
        cols = (chunk * blocks_per_chunk + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_tile = tl.load(k + b * s_kb + h * s_kh + cols[None, :] * s_ks + dims[:, None] * s_kd,
                         mask=(cols < S)[None, :] & (dims < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        real = tl.load(mask + b * s_mb + h * s_mh + cols * s_ms, mask=cols < S, other=0) != 0
        x = (k_tile.to(tl.float32) - centre[:, None]).to(k_tile.dtype)  # rounded as the eager form's
        x = tl.where(real[None, :] & (dims < D)[:, None], x, 0.0).to(k_tile.dtype)
        acc += tl.dot(x, tl.trans(x), input_precision=DOT_PREC)
    out = part + (bh * chunks + chunk) * D * D + dims[:, None] * D + dims[None, :]
    tl.store(out, acc, mask=(dims < D)[:, None] & (dims < D)[None, :])


def span_covariance_triton(keys: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``keys`` ``[B, H, S, d]``, ``key_mask`` ``[B, S]`` or ``[B, H, S]`` bool → ``C`` ``[B, H, d, d]``
    and ``μ`` ``[B, H, d]`` fp32 (see the module docstring); the same as
    :func:`rotatek_compile.kernels.reference.span_covariance` without query weighting."""
    batch, kv_heads, length, dim = keys.shape
    per_head = key_mask if key_mask.dim() == 3 else key_mask[:, None, :]  # [B, 1|H, S]
    count = per_head.sum(dim=-1, keepdim=True).float().clamp_min(1.0)  # [B, 1|H, 1]
    # Σ w·k in one pass: a [1, S] × [S, d] product per head, accumulated in fp32.
    mean = reference.fp32_product(per_head[..., None, :].to(keys.dtype), keys)[..., 0, :] / count  # [B, H, d]
    shift = mean.to(keys.dtype).contiguous()
    if batch * kv_heads * length == 0:
        return mean.new_zeros(batch, kv_heads, dim, dim), mean
    blocks = triton.cdiv(length, GRAM_BLOCK_N)
    chunks, blocks_per_chunk = _chunking(blocks, batch * kv_heads, GRAM_PROGRAMS)
    part = torch.empty(batch * kv_heads, chunks, dim, dim, dtype=torch.float32, device=keys.device)
    mask = per_head.to(torch.int8)
    mask_strides = (mask.stride(0), mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(2))
    _centred_gram_kernel[(chunks, batch * kv_heads)](
        keys, mask, shift, part, length, kv_heads, blocks_per_chunk, chunks, *keys.stride(), *mask_strides,
        D=dim, BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(dim)), BLOCK_N=GRAM_BLOCK_N,
        DOT_PREC=_dot_precision(keys.dtype), num_warps=8)
    offset = shift.float() - mean  # [B, H, d], 0 for fp32 Keys
    cov = part.sum(dim=1).view(batch, kv_heads, dim, dim) - count[..., None] * (offset[..., :, None] * offset[..., None, :])
    return (cov + cov.transpose(-1, -2)) / 2, mean


INTERPRETED = not isinstance(_share_kernel, triton.runtime.JITFunction)
