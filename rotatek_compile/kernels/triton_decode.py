"""Fused Triton decode attention over the mixed RotateK cache (pruned span + full-channel segment).

Eager twin and oracle: :func:`rotatek_compile.kernels.reference.decode_attention`; same signature,
same semantics. Shapes (``G = Hq // H`` query heads per KV head)::

    query          [B, Hq, d]         span_keys  [B, H, Sv, r]   span_values [B, H, Sv, dv]
    rotation       [B, H, d, r]       mean_residual [B, H, d]                 span_mask [B, Sv]
    keys           [B, H, Sf, d]      values     [B, H, Sf, dv]               mask      [B, Sf]

    logit_s = scale·((q R)·K̃_s + q·δμ)   s in the span   |   scale·q·k_s   s in the full segment

Two launches, neither of which syncs with the host (CUDA-graph capturable):

1. ``_decode_split_kernel`` — grid ``(splits, B·H)``. Each program owns one KV head of one row and
   one contiguous range of the concatenated sequence ``[span | full]``. It projects its ``G``
   queries itself (``qR`` ``[G, r]`` and ``q·δμ`` ``[G]``, in fp32, pre-multiplied by
   ``scale·log2(e)`` so that the softmax runs on ``exp2``), loads every K/V tile of its range once
   for all ``G`` query heads of the KV head (a ``[G_PAD, ·]`` query block, ``G`` padded to 16 rows
   for ``tl.dot``) and keeps one online softmax across both segments. With one split it writes the
   output; with several, a partial result ``(acc / l, log2-sum-exp)``.
2. ``_merge_kernel`` (several splits only) — one program per query head and slice of ``dv``
   merges all splits at once.

Measured on an H200 (``docs/performance.md``): the projection inside the split kernel pays (it was
a launch of its own); the merge inside it, by the last program of a (row, KV head) to finish,
does not (a serial tail at many splits, and slower than this second launch even at 16 splits).
The host side launches the compiled kernels directly once a plan has been seen (see
:func:`_decode_attention`).
The split count comes from the shape and the SM count (:func:`plan_splits`): as many splits as
fill one wave of resident programs. Numerics: fp16/bf16/fp32 inputs; logits, softmax statistics
and the accumulator are fp32; the span's ``qR`` is rounded to the Keys' dtype before the
tensor-core dot (bf16: ~2⁻⁹ relative per element), the probabilities to the Values' dtype before
``P·V`` (as in FlashAttention). fp32 inputs use exact fp32 dots (``input_precision="ieee"``).

Limits: ``Hq`` must be a multiple of ``H``; all tensors on one CUDA device (or CPU tensors under
``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from rotatek_compile.kernels import on_inputs_device

logger = logging.getLogger(__name__)

# exp(x) = exp2(x·log2(e)): the scale is folded into the queries once, so the inner loop is exp2.
_LOG2E = 1.4426950408889634
# tl.dot needs every dimension ≥ 16.
_MIN_DOT = 16
# SM count used for the split plan when there is no CUDA device (interpreter tests).
_CPU_SM_COUNT = 4
# Elements of a [D_CHUNK, R_PAD] slice of R in the query projection (8192 fp32: 32 KB of shared memory).
_PROJECTION_TILE = 8192
# Elements of the merge kernel's [splits, dv slice] tile (4096 fp32: 32 registers a thread at 4 warps).
_MERGE_TILE = 4096
# Launch through the compiled kernels after the first call for a plan (see _decode_attention).
FAST_LAUNCH = True


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel.

    ``block_n`` tokens per tile; ``num_warps`` / ``num_stages`` as in Triton (``num_stages`` is the
    span loop's pipelining depth, ``full_stages`` the full-segment loop's); ``ctas_per_sm`` how many
    split programs one SM holds at once (from the compiled kernel's registers and shared memory:
    128 registers × 128 threads and 44 KB at the default), so that the plan fills one wave;
    ``min_blocks`` the fewest tiles a split may own; ``maxnreg`` caps the split kernel's registers
    per thread, which pins its occupancy (``ctas_per_sm``) across its variants (ptxas otherwise
    picks 96–142 registers depending on the epilogue). At the cap, a projection in fp32 (``R`` not
    in the query's 16-bit dtype) spills: the cache stores ``R`` in its own dtype, so it does not.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    ctas_per_sm: int = 4
    min_blocks: int = 2
    full_stages: int = 2
    maxnreg: Optional[int] = 128


def default_config(dtype: torch.dtype, head_dim: int, value_dim: int) -> DecodeConfig:
    """The configuration used by :func:`decode_attention_triton` (tuned on H100, bf16, d = 128)."""
    row_bytes = max(head_dim, value_dim) * dtype.itemsize
    if row_bytes > 256:  # fp32 at d = 128, or d = 256: keep a stage's tiles small
        return _WIDE_CONFIG
    return _DEFAULT_CONFIG


_DEFAULT_CONFIG = DecodeConfig()
_WIDE_CONFIG = DecodeConfig(block_n=32, num_stages=2)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(total_len: int, rows: int, block_n: int, sm_count: int, config: DecodeConfig) -> tuple[int, int]:
    """Split count and tokens per split for ``rows = B·H`` sequences of ``total_len`` tokens.

    Programs all stream the same number of bytes, so the plan fills exactly one wave of resident
    programs (``sm_count · ctas_per_sm``): a second, partial wave would leave most SMs idle while it
    runs. Past one wave (``rows`` ≥ slots) there is one split. No split gets fewer than
    ``min_blocks`` tiles (unless the sequence is shorter) and none is empty.
    Returns ``(splits, tokens_per_split)``; ``tokens_per_split`` is a multiple of ``block_n``.
    """
    blocks = max(_cdiv(total_len, block_n), 1)
    want = max(1, (sm_count * config.ctas_per_sm) // max(rows, 1))
    splits = max(1, min(want, blocks // config.min_blocks))
    per_split = _cdiv(blocks, splits)
    return _cdiv(blocks, per_split), per_split * block_n


# --- kernels ------------------------------------------------------------------------------------

# Reductions go through tl.reduce with the combiners of tl.max / tl.sum rather than through those
# two: they are @jit functions of triton.language, which the CPU interpreter can run only if triton
# itself was imported under TRITON_INTERPRET=1 (not so when torch imported it first), while it
# recognises these combiners and reduces with numpy. Same code on GPU. Local twins as a fallback.


@triton.jit
def _local_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _local_add(a, b):
    return a + b


_max_op = getattr(tl.standard, "_elementwise_max", _local_max)
_add_op = getattr(tl.standard, "_sum_combine", _local_add)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """Fold one tile into the running softmax. ``s`` ``[G_PAD, BLOCK_N]`` base-2 logits (−inf =
    masked), ``v`` ``[BLOCK_N, DV_PAD]``; ``m_i``, ``l_i`` ``[G_PAD]``, ``acc`` ``[G_PAD, DV_PAD]`` fp32.

    A row that has seen only masked tokens keeps ``m = −inf``; ``m_safe = 0`` then makes every
    ``exp2`` below exactly 0 instead of ``exp2(−inf + inf) = NaN``.
    """
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_op))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])  # [G_PAD, BLOCK_N]
    l_i = l_i * alpha + tl.reduce(p, 1, _add_op)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["span_len", "full_len", "tokens_per_split"])
def _decode_split_kernel(
    q_ptr, rot_ptr, dmu_ptr, ks_ptr, vs_ptr, ms_ptr, kf_ptr, vf_ptr, mf_ptr, out_ptr, ws_ptr,
    lse_off, span_len, full_len, tokens_per_split, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_rb, stride_rh, stride_rd, stride_rr,
    stride_mb, stride_mh, stride_md,
    stride_ksb, stride_ksh, stride_kss, stride_ksr,
    stride_vsb, stride_vsh, stride_vss, stride_vsd,
    stride_msb, stride_mss,
    stride_kfb, stride_kfh, stride_kfs, stride_kfd,
    stride_vfb, stride_vfh, stride_vfs, stride_vfd,
    stride_mfb, stride_mfs,
    stride_ob, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, FULL_STAGES: tl.constexpr, SPLIT: tl.constexpr,
    QR_NATIVE: tl.constexpr, D_CHUNK: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (split, row·KV head) program over tokens ``[lo, hi)`` of ``[span | full]``.

    Every program first projects its ``G`` queries, ``qR`` ``[G_PAD, R_PAD]`` and ``q·δμ``
    ``[G_PAD]``, pre-multiplied by ``qk_scale = scale·log2(e)``: ``R`` is 8 KB at d = 128, r = 32,
    read from L2 by all splits of a row, which costs less than a launch of its own.
    ``QR_NATIVE``: ``q`` and ``R`` share a 16-bit dtype, so the projection runs on tensor cores from
    their own values (exact products, fp32 sums); otherwise both are widened to fp32 (exact dot).
    ``D_CHUNK`` rows of ``R`` at a time, so that a slice's operands fit in shared memory at any d, r.
    ``SPLIT``: write the normalised partial ``acc / l`` ``[B, Hq, splits, DV]`` at the start of the
    fp32 workspace and ``lse = m + log2(l)`` (base 2, −inf for an all-masked range)
    ``[B, Hq, splits]`` at ``lse_off``, for ``_merge_kernel``. Without ``SPLIT``: write ``out``
    ``[B, Hq, DV]``.
    ``FULL_STAGES``: pipelining depth of the full-segment loop (short in RotateK: prompt, text and
    generated tokens); lower than the span loop's, it saves shared memory, hence occupancy.
    ``UPCAST``: compute in fp32 from the load on (the interpreter cannot compute in bf16).
    """
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    pid = tl.program_id(1)
    b = pid // NUM_HEADS
    h = pid % NUM_HEADS
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_g = tl.arange(0, G_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    g_mask = offs_g < GROUP
    r_mask = offs_r < R
    d_mask = offs_d < D
    v_mask = offs_v < DV

    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, span_len + full_len)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.full([G_PAD], 0.0, tl.float32)
    acc = tl.full([G_PAD, DV_PAD], 0.0, tl.float32)

    # --- the queries, projected: qR [G_PAD, R_PAD] and q·δμ [G_PAD], pre-scaled by scale·log2(e)
    q_base = q_ptr + b64 * stride_qb + (h * GROUP).to(tl.int64) * stride_qh
    rot_base = rot_ptr + b64 * stride_rb + h64 * stride_rh
    dmu_base = dmu_ptr + b64 * stride_mb + h64 * stride_mh
    qr = tl.full([G_PAD, R_PAD], 0.0, tl.float32)
    qdm = tl.full([G_PAD], 0.0, tl.float32)
    for first in tl.static_range(0, D_PAD, D_CHUNK):  # R in [D_CHUNK, R_PAD] slices (shared memory)
        offs_c = first + tl.arange(0, D_CHUNK)
        c_mask = offs_c < D
        q_c = tl.load(q_base + offs_g[:, None] * stride_qh + offs_c[None, :] * stride_qd,
                      mask=g_mask[:, None] & c_mask[None, :], other=0.0)  # [G_PAD, D_CHUNK]
        rot_c = tl.load(rot_base + offs_c[:, None] * stride_rd + offs_r[None, :] * stride_rr,
                        mask=c_mask[:, None] & r_mask[None, :], other=0.0)  # [D_CHUNK, R_PAD]
        q_c32 = q_c.to(tl.float32)
        if QR_NATIVE:
            qr += tl.dot(q_c, rot_c)
        else:
            qr += tl.dot(q_c32, rot_c.to(tl.float32), input_precision="ieee")
        dmu_c = tl.load(dmu_base + offs_c * stride_md, mask=c_mask, other=0.0).to(tl.float32)  # [D_CHUNK]
        qdm += tl.reduce(q_c32 * dmu_c[None, :], 1, _add_op)
    qr = qr * qk_scale
    qdm = qdm * qk_scale  # [G_PAD] fp32

    # --- pruned span: logits = (qR)·K̃ + q·δμ
    ks_base = ks_ptr + b64 * stride_ksb + h64 * stride_ksh
    vs_base = vs_ptr + b64 * stride_vsb + h64 * stride_vsh
    ms_base = ms_ptr + b64 * stride_msb
    if not UPCAST:
        qr = qr.to(ks_ptr.dtype.element_ty)  # [G_PAD, R_PAD]
    span_hi = tl.minimum(hi, span_len)
    for start in range(lo, span_hi, BLOCK_N):
        tok = start + offs_n  # [BLOCK_N]
        inside = tok < span_hi
        real = tl.load(ms_base + tok * stride_mss, mask=inside, other=0) != 0
        k = tl.load(ks_base + tok[:, None] * stride_kss + offs_r[None, :] * stride_ksr,
                    mask=inside[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, R_PAD]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(qr, tl.trans(k), input_precision=DOT_PREC) + qdm[:, None]  # [G_PAD, BLOCK_N]
        s = tl.where(real[None, :], s, float("-inf"))
        v = tl.load(vs_base + tok[:, None] * stride_vss + offs_v[None, :] * stride_vsd,
                    mask=inside[:, None] & v_mask[None, :], other=0.0)  # [BLOCK_N, DV_PAD]
        if UPCAST:
            v = v.to(tl.float32)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)

    # --- full-channel segment: logits = q·k, q pre-scaled here
    kf_base = kf_ptr + b64 * stride_kfb + h64 * stride_kfh
    vf_base = vf_ptr + b64 * stride_vfb + h64 * stride_vfh
    mf_base = mf_ptr + b64 * stride_mfb
    q = tl.load(q_base + offs_g[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # loaded again: not live in the span loop
    q = q.to(tl.float32) * qk_scale  # [G_PAD, D_PAD]
    if not UPCAST:
        q = q.to(kf_ptr.dtype.element_ty)
    full_lo = tl.maximum(lo, span_len) - span_len
    full_hi = hi - span_len  # ≤ full_lo (no iteration) when the range ends inside the span
    for start in tl.range(full_lo, full_hi, BLOCK_N, num_stages=FULL_STAGES):
        tok = start + offs_n
        inside = tok < full_hi
        real = tl.load(mf_base + tok * stride_mfs, mask=inside, other=0) != 0
        k = tl.load(kf_base + tok[:, None] * stride_kfs + offs_d[None, :] * stride_kfd,
                    mask=inside[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [G_PAD, BLOCK_N]
        s = tl.where(real[None, :], s, float("-inf"))
        v = tl.load(vf_base + tok[:, None] * stride_vfs + offs_v[None, :] * stride_vfd,
                    mask=inside[:, None] & v_mask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)

    # --- epilogue; l = 0 ⇔ every token of the range was masked ⇒ zeros (and lse = −inf)
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    hq = (h * GROUP + offs_g).to(tl.int64)  # [G_PAD] query-head index
    store_mask = g_mask[:, None] & v_mask[None, :]
    if SPLIT:
        part_ptr = ws_ptr
        lse_ptr = ws_ptr + lse_off
        row = (b64 * (NUM_HEADS * GROUP) + hq) * num_splits + split  # [G_PAD]
        tl.store(part_ptr + row[:, None] * DV + offs_v[None, :], acc, mask=store_mask)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + row, lse, mask=g_mask)
    else:
        ptrs = out_ptr + b64 * stride_ob + hq[:, None] * stride_oh + offs_v[None, :] * stride_od
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_kernel(
    ws_ptr, out_ptr,
    lse_off, num_splits,
    stride_ob, stride_oh, stride_od,
    NUM_Q_HEADS: tl.constexpr, DV: tl.constexpr, DV_BLOCK: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Grid ``(B·Hq, cdiv(DV, DV_BLOCK))``: ``out[b, hq, slice]`` from all ``num_splits`` partials at
    once (``SPLITS_PAD`` ≥ ``num_splits``): ``Σ_s 2^(lse_s − M)·part_s / Σ_s 2^(lse_s − M)``."""
    pid = tl.program_id(0)
    vb = tl.program_id(1)
    b = pid // NUM_Q_HEADS
    hq = pid % NUM_Q_HEADS
    row0 = pid.to(tl.int64) * num_splits
    offs_s = tl.arange(0, SPLITS_PAD)
    inside = offs_s < num_splits
    lse = tl.load(ws_ptr + lse_off + row0 + offs_s, mask=inside, other=float("-inf"))  # [SPLITS_PAD]
    m = tl.reduce(lse, 0, _max_op)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # 0 for −inf (masked or absent splits)
    den = tl.reduce(w, 0, _add_op)
    offs_v = vb * DV_BLOCK + tl.arange(0, DV_BLOCK)
    v_mask = offs_v < DV
    part = tl.load(ws_ptr + (row0 + offs_s)[:, None] * DV + offs_v[None, :],
                   mask=inside[:, None] & v_mask[None, :], other=0.0)  # [SPLITS_PAD, DV_BLOCK]
    out = tl.reduce(w[:, None] * part, 0, _add_op) / tl.where(den == 0.0, 1.0, den)
    ptrs = out_ptr + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + offs_v * stride_od
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=v_mask)


# --- host side ----------------------------------------------------------------------------------


def _spec_key(args: tuple) -> tuple:
    """What Triton specialises a launch on, per argument: an int's being 1, a multiple of 16, or
    past int32; a tensor's dtype and 16-byte alignment."""
    return tuple([
        (a == 1, a & 15 == 0, a > 0x7FFFFFFF) if a.__class__ is int
        else (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, Tensor) else None
        for a in args])


# Compiled kernels by (device, plan, _spec_key of all arguments): see _decode_attention.
_COMPILED: dict = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pad(n: int) -> int:
    return max(_next_pow2(n), _MIN_DOT)


def _placeholder(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A one-element stand-in for an empty segment: never read, but typed like ``like``."""
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


@on_inputs_device
def decode_attention_triton(
    query: Tensor,
    span_keys: Tensor,
    rotation: Tensor,
    mean_residual: Tensor,
    span_values: Tensor,
    span_mask: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor,
    scale: float,
) -> Tensor:
    """Triton twin of :func:`rotatek_compile.kernels.reference.decode_attention` (same arguments,
    same result: ``[B, Hq, dv]`` in ``query``'s dtype, zeros for a row whose tokens are all masked).

    Inputs may be non-contiguous. No host synchronisation: safe to capture in a CUDA graph.
    """
    return _decode_attention(query, span_keys, rotation, mean_residual, span_values, span_mask,
                             keys, values, mask, scale)


def _decode_attention(
    query: Tensor,
    span_keys: Tensor,
    rotation: Tensor,
    mean_residual: Tensor,
    span_values: Tensor,
    span_mask: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor,
    scale: float,
    config: Optional[DecodeConfig] = None,
    num_splits: Optional[int] = None,
) -> Tensor:
    """:func:`decode_attention_triton` with the launch parameters exposed (tests, benchmarks).

    ``num_splits`` forces the split count (clamped to the number of tiles); ``None`` plans it.

    Host cost: Triton's per-launch binding, specialisation and cache lookup take tens of µs per
    kernel, longer than the kernels themselves at B = 1. So the first call for a *plan* (everything
    the constexprs derive from) and a specialisation key goes through ``kernel[grid](...)``
    (compiling if needed), which returns the compiled kernels; later calls with the same key launch
    those directly, ``compiled[grid](*args, *constexprs)`` (``FAST_LAUNCH``).
    """
    batch, q_heads, dim = query.shape
    _, kv_heads, span_len, rank = span_keys.shape
    full_len = keys.shape[2]
    value_dim = values.shape[-1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    if keys.shape[1] != kv_heads or keys.shape[-1] != dim or span_values.shape[-1] != value_dim:
        raise ValueError(
            f"inconsistent shapes: query {tuple(query.shape)}, span_keys {tuple(span_keys.shape)}, "
            f"span_values {tuple(span_values.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}")
    group = q_heads // kv_heads
    device = query.device
    out = torch.empty(batch, q_heads, value_dim, dtype=query.dtype, device=device)
    total = span_len + full_len
    if total == 0 or batch == 0:
        return out.zero_()
    if span_len == 0:  # the loops never run; the pointers only need the right element type
        span_keys = _placeholder(span_keys, (1, 1, 1, rank))
        span_values = _placeholder(span_values, (1, 1, 1, value_dim))
        span_mask = torch.zeros(1, 1, dtype=torch.bool, device=device)
    if full_len == 0:
        keys = _placeholder(keys, (1, 1, 1, dim))
        values = _placeholder(values, (1, 1, 1, value_dim))
        mask = torch.zeros(1, 1, dtype=torch.bool, device=device)

    if config is None:
        config = default_config(span_values.dtype, dim, value_dim)
    rows = batch * kv_heads
    on_gpu = query.is_cuda
    device_index = (device.index or 0) if on_gpu else -1
    if num_splits is None:
        sm_count = _sm_count(device_index) if on_gpu else _CPU_SM_COUNT
        splits, per_split = plan_splits(total, rows, config.block_n, sm_count, config)
    else:
        blocks = _cdiv(total, config.block_n)
        per_split = _cdiv(blocks, max(1, min(num_splits, blocks)))
        splits, per_split = _cdiv(blocks, per_split), per_split * config.block_n
    split = splits > 1
    splits_p2 = _next_pow2(splits)
    dtypes = (span_keys.dtype, span_values.dtype, keys.dtype, values.dtype)
    # The interpreter computes bf16 wrongly unless values are widened right after the load.
    upcast = INTERPRETED and torch.bfloat16 in dtypes
    dot_prec = "ieee" if upcast or torch.float32 in dtypes else "tf32"  # only fp32 operands heed it
    qr_native = (not upcast and query.dtype == rotation.dtype
                 and query.dtype in (torch.float16, torch.bfloat16))
    qk_scale = float(scale) * _LOG2E
    g_pad, d_pad, r_pad, dv_pad = _pad(group), _pad(dim), _pad(rank), _pad(value_dim)
    dv_block = max(1, min(_next_pow2(value_dim), _MERGE_TILE // splits_p2))
    d_chunk = max(_MIN_DOT, min(d_pad, _PROJECTION_TILE // r_pad))

    # fp32 workspace: the partials [B, Hq, splits, dv], then their lse [B, Hq, splits].
    lse_off = batch * q_heads * splits * value_dim if split else 0
    workspace = torch.empty(max(lse_off + (batch * q_heads * splits if split else 0), 1),
                            dtype=torch.float32, device=device)

    grids = [(splits, rows, 1)]
    launches = [
        # the split kernel
        (query, rotation, mean_residual, span_keys, span_values, span_mask, keys, values, mask, out,
         workspace, lse_off, span_len, full_len, per_split, qk_scale,
         *query.stride(), *rotation.stride(), *mean_residual.stride(),
         *span_keys.stride(), *span_values.stride(), *span_mask.stride(),
         *keys.stride(), *values.stride(), *mask.stride(), *out.stride()),
    ]
    if split:  # the merge
        grids.append((batch * q_heads, _cdiv(value_dim, dv_block), 1))
        launches.append((workspace, out, lse_off, splits, *out.stride()))

    fast = FAST_LAUNCH and on_gpu and not INTERPRETED
    if fast:
        plan = (kv_heads, group, dim, rank, value_dim, config, splits_p2 if split else 0, qr_native,
                d_chunk, dot_prec, upcast)
        key = (device_index, plan, _spec_key(sum(launches, ())))
        hit = _COMPILED.get(key)
        if hit is not None:
            for (compiled, constexprs), grid, args in zip(hit, grids, launches):
                compiled[grid](*args, *constexprs)
            return out

    split_options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg:
        split_options["maxnreg"] = config.maxnreg
    kernels = [
        (_decode_split_kernel, split_options,
         dict(NUM_HEADS=kv_heads, GROUP=group, G_PAD=g_pad, D=dim, D_PAD=d_pad, R=rank, R_PAD=r_pad,
              DV=value_dim, DV_PAD=dv_pad, BLOCK_N=config.block_n, FULL_STAGES=config.full_stages,
              SPLIT=split, QR_NATIVE=qr_native, D_CHUNK=d_chunk, DOT_PREC=dot_prec, UPCAST=upcast)),
        (_merge_kernel, {"num_warps": config.num_warps},
         dict(NUM_Q_HEADS=q_heads, DV=value_dim, DV_BLOCK=dv_block, SPLITS_PAD=splits_p2)),
    ]
    compiled_kernels = []
    for (kernel, opts, constexprs), grid, args in zip(kernels, grids, launches):
        compiled = kernel[grid](*args, **constexprs, **opts)
        names = kernel.arg_names[len(args):]
        if hasattr(compiled, "__getitem__") and sorted(names) == sorted(constexprs):
            compiled_kernels.append((compiled, tuple(constexprs[n] for n in names)))
    if fast:
        if len(compiled_kernels) == len(launches):
            _COMPILED[key] = tuple(compiled_kernels)
        else:
            logger.warning("rotatek decode: no fast launch for this plan; Triton's launcher is used")
    return out


# True when this module was imported under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors).
INTERPRETED = not isinstance(_decode_split_kernel, triton.runtime.JITFunction)
