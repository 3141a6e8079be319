"""Fused Triton kernels of the compression after the prefill: window shares and span covariance.

Both are memory-bound statistics of one layer's Keys, which the eager forms compute in several
passes over ``[B, H, ·, S]`` temporaries; here each kernel reads the Keys once. Eager twins and
oracles: :func:`rotatek_compile.tiers.window_share` and
:func:`rotatek_compile.kernels.reference.span_covariance` (CPU path, and the GPU path without
triton). Shapes (``G = Hq // H`` query heads per KV head, ``M = G·W`` window rows per KV head)::

    window share:    queries [B, H, M, d], keys [B, H, S, d], span [B, S] bool → share [B, H, S] fp32
        p[m, s] = exp(scale·q_m·k_s − lse_m),  lse_m = log Σ_{s' in span} exp(scale·q_m·k_s')
        share[s] = (1/M) Σ_m p[m, s]   for s in the span, 0 elsewhere
    span covariance: keys [B, H, S, d], mask [B, S] or [B, H, S] bool → C [B, H, d, d], μ [B, H, d] fp32
        μ = mean of the masked Keys;  μ' = μ rounded to the Keys' dtype
        C = Σ_s w_s (k_s − μ')(k_s − μ')ᵀ − n (μ' − μ)(μ' − μ)ᵀ      (centred in the Keys' dtype)

The window share's eager form writes the ``[B, H, M, S]`` fp32 logits and reads them back four
times (134 MB a layer at 16k tokens, against the Keys' 34 MB); here the logits never leave
registers. ``_chunk_statistics_kernel`` keeps an online max and sum of ``exp2`` over one chunk of
Keys per query row; ``_share_kernel`` combines the chunks into each row's ``lse`` and sums
``exp2(s − lse)`` over the rows. The covariance takes ``_masked_sum_kernel`` (``μ``) and
``_centred_gram_kernel``, which accumulates one chunk's ``xxᵀ``, ``x = w·(k − μ')`` rounded to the
Keys' dtype as the eager form does, on tensor cores into fp32. Chunks' partial results are added
in a fixed order (deterministic).

Each statistic is two launches for all the layers of one shape (``window_shares_triton``,
``span_covariances_triton``): at one row of 16k tokens a layer's kernels take microseconds, and a
launch per layer cost more host time than the eager forms' whole device time.

Logits and sums are fp32 (half-precision dots accumulate in fp32; fp32 inputs use exact fp32
dots). A row without span tokens gets share 0 everywhere, and ``C = 0``, ``μ = 0``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from rotatek_compile.kernels import on_inputs_device, reference
# tl.max / tl.sum as tl.reduce combiners, which Triton's CPU interpreter runs however triton was imported
from rotatek_compile.kernels.triton_decode import _add_op, _max_op

_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every dimension ≥ 16
BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # Keys per tile
# Programs a launch aims for (a few waves on a large GPU): sets the chunks per (row block, layer, B·H).
TARGET_PROGRAMS = 512
# The covariance's programs: each chunk writes a [d, d] fp32 partial sum, so fewer of them.
GRAM_PROGRAMS = 256
GRAM_BLOCK_N = 64

# Every kernel serves several layers in one launch: the Keys of layer ``l`` are at ``k + k_at[l]``
# (element offsets from the first layer's Keys, whatever their allocations; the layers share shape
# and strides), the small per-layer inputs are stacked. Program ids that name a (layer, row, KV head)
# count ``lbh = (l·B + b)·H + h``.


@triton.jit
def _program(lbh, BH, H):
    """``(layer, row, KV head)`` of a program id that counts ``(l·B + b)·H + h``, in int64: a row's
    offset ``b·H·S·d`` passes 2³¹ elements at batch 16 × 128k tokens (8 KV heads, d = 128)."""
    return (lbh // BH).to(tl.int64), ((lbh % BH) // H).to(tl.int64), (lbh % H).to(tl.int64)


@triton.jit
def _key_tile(k_base, mask_base, cols, dims, S, s_ks, s_kd, s_ms, D: tl.constexpr):
    """The Keys at tokens ``cols`` as ``[BLOCK_D, BLOCK_N]`` (0 past ``S`` and ``D``), and which of
    those tokens the mask marks."""
    k_tile = tl.load(k_base + cols[None, :] * s_ks + dims[:, None] * s_kd,
                     mask=(cols < S)[None, :] & (dims < D)[:, None], other=0.0)
    real = tl.load(mask_base + cols * s_ms, mask=cols < S, other=0) != 0
    return k_tile, real


@triton.jit
def _query_tile(q_base, rows, dims, M, s_qm, s_qd, D: tl.constexpr):
    """The window's query rows ``rows`` as ``[BLOCK_M, BLOCK_D]`` (0 past ``M`` and ``D``)."""
    return tl.load(q_base + rows[:, None] * s_qm + dims[None, :] * s_qd,
                   mask=(rows < M)[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit(do_not_specialize=["M", "S", "blocks_per_chunk", "chunks", "s_kb", "s_kh", "s_sl", "s_sb"])
def _chunk_statistics_kernel(
    q, k, k_at, span, part_max, part_sum,
    M, S, BH, H, qk_scale, blocks_per_chunk, chunks,
    s_ql, s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_sl, s_sb, s_ss,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    row_block = tl.program_id(1)
    lbh = tl.program_id(2)
    layer, b, h = _program(lbh, BH, H)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_tile = _query_tile(q + layer * s_ql + b * s_qb + h * s_qh, rows, dims, M, s_qm, s_qd, D)  # [BLOCK_M, BLOCK_D]
    k_base = k + tl.load(k_at + layer) + b * s_kb + h * s_kh
    span_base = span + layer * s_sl + b * s_sb
    row_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
    row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    for j in range(0, blocks_per_chunk):
        cols = (chunk * blocks_per_chunk + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_tile, real = _key_tile(k_base, span_base, cols, dims, S, s_ks, s_kd, s_ss, D)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q_tile, k_tile, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
        s = tl.where(real[None, :], s, -float("inf"))
        new_max = tl.maximum(row_max, tl.reduce(s, 1, _max_op))
        finite_max = tl.where(new_max == -float("inf"), 0.0, new_max)  # a row with no real Key yet
        row_sum = row_sum * tl.exp2(row_max - finite_max) + tl.reduce(tl.exp2(s - finite_max[:, None]), 1, _add_op)
        row_max = new_max
    out = (lbh * chunks + chunk) * M + rows
    tl.store(part_max + out, row_max, mask=rows < M)
    tl.store(part_sum + out, row_sum, mask=rows < M)


@triton.jit(do_not_specialize=["M", "S", "chunks", "s_kb", "s_kh", "s_sl", "s_sb"])
def _share_kernel(
    q, k, k_at, span, part_max, part_sum, share,
    M, S, BH, H, qk_scale, chunks,
    s_ql, s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_sl, s_sb, s_ss,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    key_block = tl.program_id(0)
    lbh = tl.program_id(1)
    layer, b, h = _program(lbh, BH, H)
    cols = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_tile, real = _key_tile(k + tl.load(k_at + layer) + b * s_kb + h * s_kh, span + layer * s_sl + b * s_sb,
                             cols, dims, S, s_ks, s_kd, s_ss, D)  # [BLOCK_D, BLOCK_N]
    q_base = q + layer * s_ql + b * s_qb + h * s_qh
    total = tl.full([BLOCK_N], 0.0, tl.float32)
    for row_start in range(0, M, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        in_rows = rows < M
        # lse of each row from the chunks' (max, sum): max over chunks, then the rescaled sums.
        row_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
        for c in range(0, chunks):
            row_max = tl.maximum(row_max, tl.load(part_max + (lbh * chunks + c) * M + rows, mask=in_rows,
                                                  other=-float("inf")))
        finite_max = tl.where(row_max == -float("inf"), 0.0, row_max)
        row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
        for c in range(0, chunks):
            at = (lbh * chunks + c) * M + rows
            row_sum += tl.load(part_sum + at, mask=in_rows, other=0.0) * tl.exp2(
                tl.load(part_max + at, mask=in_rows, other=-float("inf")) - finite_max)
        lse = finite_max + tl.log2(tl.maximum(row_sum, 1e-30))
        q_tile = _query_tile(q_base, rows, dims, M, s_qm, s_qd, D)  # [BLOCK_M, BLOCK_D]
        s = tl.dot(q_tile, k_tile, input_precision=DOT_PREC) * qk_scale
        p = tl.where(in_rows[:, None] & real[None, :], tl.exp2(s - lse[:, None]), 0.0)
        total += tl.reduce(p, 0, _add_op)
    tl.store(share + lbh * S + cols, total / M, mask=cols < S)


@triton.jit(do_not_specialize=["S", "blocks_per_chunk", "chunks", "s_kb", "s_kh", "s_ml", "s_mb", "s_mh"])
def _masked_sum_kernel(
    k, k_at, mask, part, S, BH, H, blocks_per_chunk, chunks,
    s_kb, s_kh, s_ks, s_kd,
    s_ml, s_mb, s_mh, s_ms,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    chunk = tl.program_id(0)
    lbh = tl.program_id(1)
    layer, b, h = _program(lbh, BH, H)
    dims = tl.arange(0, BLOCK_D)
    k_base = k + tl.load(k_at + layer) + b * s_kb + h * s_kh
    mask_base = mask + layer * s_ml + b * s_mb + h * s_mh
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for j in range(0, blocks_per_chunk):
        cols = (chunk * blocks_per_chunk + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_tile, real = _key_tile(k_base, mask_base, cols, dims, S, s_ks, s_kd, s_ms, D)  # [BLOCK_D, BLOCK_N]
        acc += tl.reduce(tl.where(real[None, :], k_tile.to(tl.float32), 0.0), 1, _add_op)
    tl.store(part + (lbh * chunks + chunk) * D + dims, acc, mask=dims < D)


@triton.jit(do_not_specialize=["S", "blocks_per_chunk", "chunks", "s_kb", "s_kh", "s_ml", "s_mb", "s_mh"])
def _centred_gram_kernel(
    k, k_at, mask, shift, part, S, BH, H, blocks_per_chunk, chunks,
    s_kb, s_kh, s_ks, s_kd,
    s_ml, s_mb, s_mh, s_ms,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    chunk = tl.program_id(0)
    lbh = tl.program_id(1)
    layer, b, h = _program(lbh, BH, H)
    dims = tl.arange(0, BLOCK_D)
    centre = tl.load(shift + lbh * D + dims, mask=dims < D, other=0.0).to(tl.float32)  # μ' [BLOCK_D]
    k_base = k + tl.load(k_at + layer) + b * s_kb + h * s_kh
    mask_base = mask + layer * s_ml + b * s_mb + h * s_mh
    acc = tl.full([BLOCK_D, BLOCK_D], 0.0, tl.float32)
    for j in range(0, blocks_per_chunk):
        cols = (chunk * blocks_per_chunk + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_tile, real = _key_tile(k_base, mask_base, cols, dims, S, s_ks, s_kd, s_ms, D)  # [BLOCK_D, BLOCK_N]
        x = (k_tile.to(tl.float32) - centre[:, None]).to(k_tile.dtype)  # rounded as the eager form's
        x = tl.where(real[None, :] & (dims < D)[:, None], x, 0.0).to(k_tile.dtype)
        acc += tl.dot(x, tl.trans(x), input_precision=DOT_PREC)
    out = part + (lbh * chunks + chunk) * D * D + dims[:, None] * D + dims[None, :]
    tl.store(out, acc, mask=(dims < D)[:, None] & (dims < D)[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands heed it


def _chunking(blocks: int, programs_per_chunk: int, target: int) -> tuple[int, int]:
    """``(chunks, blocks per chunk)``: about ``target`` programs in all, every chunk non-empty."""
    chunks = max(1, min(blocks, target // max(programs_per_chunk, 1)))
    per_chunk = triton.cdiv(blocks, chunks)
    return triton.cdiv(blocks, per_chunk), per_chunk


def _check_alike(keys: Sequence[Tensor]) -> None:
    first = keys[0]
    for other in keys[1:]:
        if (other.shape != first.shape or other.stride() != first.stride() or other.dtype != first.dtype
                or other.device != first.device):
            raise ValueError("rotatek: layers batched into one kernel launch need Keys of one shape, "
                             f"strides, dtype and device; got {tuple(first.shape)} {first.dtype} on "
                             f"{first.device} and {tuple(other.shape)} {other.dtype} on {other.device}")


def _layer_offsets(keys: Sequence[Tensor]) -> Tensor:
    """``[L]`` int64 on the Keys' device: each layer's Keys as an element offset from the first's.
    Copied from pinned memory without waiting: the host keeps queueing the prefill's work."""
    first = keys[0]
    if len(keys) == 1:
        return torch.zeros(1, dtype=torch.int64, device=first.device)
    size = first.element_size()
    offsets = [(k.data_ptr() - first.data_ptr()) // size for k in keys]
    host = torch.tensor(offsets, dtype=torch.int64, pin_memory=first.is_cuda)
    return host.to(first.device, non_blocking=True)


@on_inputs_device
def window_shares_triton(queries: Sequence[Tensor], keys: Sequence[Tensor], scale: float,
                         spans: Sequence[Tensor]) -> Tensor:
    """Per layer ``queries`` ``[B, Hq, W, d]``, ``keys`` ``[B, H, S, d]`` (one shape and layout),
    ``spans`` ``[B, S]`` bool → ``[L, B, H, S]`` fp32 (see the module docstring): each layer's
    :func:`rotatek_compile.tiers.window_share`, every layer in the same two launches."""
    _check_alike(keys)
    layers = len(keys)
    batch, kv_heads, length, dim = keys[0].shape
    q = torch.stack([x.to(keys[0].dtype) for x in queries]).reshape(layers, batch, kv_heads, -1, dim)  # [L, B, H, M, d]
    rows = q.shape[3]
    share = torch.zeros(layers, batch, kv_heads, length, dtype=torch.float32, device=keys[0].device)
    if layers * batch * kv_heads * length * rows == 0:
        return share
    mask = torch.stack(list(spans)).to(torch.int8)  # [L, B, S]
    programs = layers * batch * kv_heads  # (layer, row, KV head)
    row_blocks = triton.cdiv(rows, BLOCK_M)
    key_blocks = triton.cdiv(length, BLOCK_N)
    chunks, blocks_per_chunk = _chunking(key_blocks, row_blocks * programs, TARGET_PROGRAMS)
    part_max = torch.empty(programs, chunks, rows, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    common = dict(D=dim, BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(dim)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  DOT_PREC=_dot_precision(q.dtype))
    at = _layer_offsets(keys)
    strides = (*q.stride(), *keys[0].stride(), *mask.stride())
    qk_scale = scale * _LOG2E
    _chunk_statistics_kernel[(chunks, row_blocks, programs)](
        q, keys[0], at, mask, part_max, part_sum, rows, length, batch * kv_heads, kv_heads, qk_scale,
        blocks_per_chunk, chunks, *strides, **common)
    _share_kernel[(key_blocks, programs)](
        q, keys[0], at, mask, part_max, part_sum, share, rows, length, batch * kv_heads, kv_heads, qk_scale,
        chunks, *strides, **common)
    return share


def window_share_triton(queries: Tensor, keys: Tensor, scale: float, span: Tensor) -> Tensor:
    """One layer of :func:`window_shares_triton`: ``[B, H, S]`` fp32, the same as
    :func:`rotatek_compile.tiers.window_share`."""
    return window_shares_triton([queries], [keys], scale, [span])[0]


@on_inputs_device
def span_covariances_triton(keys: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per layer ``keys`` ``[B, H, S, d]`` (one shape and layout) and ``masks`` ``[B, S]`` or
    ``[B, H, S]`` bool (one kind) → ``C`` ``[L, B, H, d, d]`` and ``μ`` ``[L, B, H, d]`` fp32 (see the
    module docstring): each layer's :func:`rotatek_compile.kernels.reference.span_covariance`
    without query weighting, every layer in the same two launches."""
    _check_alike(keys)
    layers = len(keys)
    batch, kv_heads, length, dim = keys[0].shape
    per_head = torch.stack([m if m.dim() == 3 else m[:, None, :] for m in masks])  # [L, B, 1|H, S]
    count = per_head.sum(dim=-1, keepdim=True).float().clamp_min(1.0)  # [L, B, 1|H, 1]
    programs = layers * batch * kv_heads
    if programs * length == 0:
        mean = torch.zeros(layers, batch, kv_heads, dim, dtype=torch.float32, device=keys[0].device)
        return mean.new_zeros(layers, batch, kv_heads, dim, dim), mean
    mask = per_head.to(torch.int8)
    mask_strides = (mask.stride(0), mask.stride(1), mask.stride(2) if mask.shape[2] > 1 else 0, mask.stride(3))
    at = _layer_offsets(keys)
    blocks = triton.cdiv(length, GRAM_BLOCK_N)
    chunks, blocks_per_chunk = _chunking(blocks, programs, GRAM_PROGRAMS)
    shapes = dict(D=dim, BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(dim)), BLOCK_N=GRAM_BLOCK_N)
    sums = torch.empty(programs, chunks, dim, dtype=torch.float32, device=keys[0].device)
    _masked_sum_kernel[(chunks, programs)](
        keys[0], at, mask, sums, length, batch * kv_heads, kv_heads, blocks_per_chunk, chunks,
        *keys[0].stride(), *mask_strides, **shapes)
    mean = sums.sum(dim=1).view(layers, batch, kv_heads, dim) / count  # [L, B, H, d]
    shift = mean.to(keys[0].dtype).contiguous()  # μ', the centre the Keys' dtype holds
    part = torch.empty(programs, chunks, dim, dim, dtype=torch.float32, device=keys[0].device)
    _centred_gram_kernel[(chunks, programs)](
        keys[0], at, mask, shift, part, length, batch * kv_heads, kv_heads, blocks_per_chunk, chunks,
        *keys[0].stride(), *mask_strides, DOT_PREC=_dot_precision(keys[0].dtype), num_warps=8, **shapes)
    gram = part.sum(dim=1).view(layers, batch, kv_heads, dim, dim)
    return reference.covariance_about_mean(gram, count, shift, mean), mean


def span_covariance_triton(keys: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """One layer of :func:`span_covariances_triton`: ``C`` ``[B, H, d, d]`` and ``μ`` ``[B, H, d]``
    fp32, the same as :func:`rotatek_compile.kernels.reference.span_covariance` without weighting."""
    cov, mean = span_covariances_triton([keys], [key_mask])
    return cov[0], mean[0]


INTERPRETED = not isinstance(_share_kernel, triton.runtime.JITFunction)
