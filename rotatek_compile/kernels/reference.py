"""Plain-PyTorch RotateK: the CPU path and the oracle every kernel is tested against.

Notation (shapes in comments): ``B`` batch rows, ``Hq`` query heads, ``H`` KV heads
(``G = Hq // H`` query heads per KV head), ``S`` span tokens, ``W`` query window, ``d`` head dim,
``r`` kept Key channels, ``dv`` value dim. Masks are bool, ``True`` = the token is real.

The method, per batch row and KV head, with ``K`` the post-RoPE span Keys::

    μ   = mean_s K[s]
    C   = (K-μ)ᵀ(K-μ), symmetrised, fp32
    q̄_c = mean over the head's query group of ‖Q[-W:, c]‖₂ ;  q̄ = max(q̄, 1e-3·median(q̄))
    C   = C ⊙ (q̄ q̄ᵀ) ;  C += 1e-4·mean(|diag C|)·I           (query-aware, default)
    R   = top-r eigenvectors of C                               # [d, r]
    K̃   = K R ;  δμ = μ (I − R Rᵀ)
    decode logit_s = scale·((q R)·K̃_s + q·δμ)   (span)   |   scale·q·k_s   (everything else)
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

# Numerics of the query-aware weighting: floor of q̄ relative to its median, and
# ridge added to the diagonal relative to its mean, so that C stays positive definite.
QUERY_NORM_FLOOR = 1e-3
COVARIANCE_RIDGE = 1e-4


class CompressedSpan(NamedTuple):
    """What the cache keeps of a span's Keys: ``r`` rotated channels and the mean correction,
    all three in the Keys' dtype (the cache's: what is stored is what is counted)."""

    keys: Tensor  # [B, H, S, r]  K̃ = K R
    rotation: Tensor  # [B, H, d, r]  R, orthonormal columns (up to the dtype's rounding)
    mean_residual: Tensor  # [B, H, d]  δμ = μ(I − RRᵀ)


def _all_true(keys: Tensor) -> Tensor:
    return torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)


def query_channel_norms(queries: Tensor, num_kv_heads: int) -> Tensor:
    """Per-channel query magnitude of the last window, averaged over each KV head's query group.

    Parameters
    ----------
    queries : Tensor
        ``[B, Hq, W, d]`` post-RoPE queries of the window (the last ``W`` prompt tokens).
    num_kv_heads : int
        ``H``; ``Hq`` must be a multiple of it.

    Returns
    -------
    Tensor
        ``[B, H, d]`` fp32: ``q̄_c = mean_g ‖Q_g[:, c]‖₂``, floored at ``1e-3·median(q̄)``.
    """
    batch, q_heads, _, dim = queries.shape
    if q_heads % num_kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    norms = queries.float().norm(dim=2)  # [B, Hq, d]
    norms = norms.view(batch, num_kv_heads, q_heads // num_kv_heads, dim).mean(dim=2)  # [B, H, d]
    floor = QUERY_NORM_FLOOR * norms.median(dim=-1, keepdim=True).values
    return torch.maximum(norms, floor)


def span_covariance(
    keys: Tensor,
    key_mask: Optional[Tensor] = None,
    query_norms: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Covariance of the span's Keys, optionally weighted by query magnitude.

    Parameters
    ----------
    keys : Tensor
        ``[B, H, S, d]`` post-RoPE Keys of the span.
    key_mask : Tensor, optional
        ``[B, S]`` bool, which span entries are real tokens (default: all), or ``[B, H, S]``: which
        tokens each KV head takes.
    query_norms : Tensor, optional
        ``[B, H, d]`` from :func:`query_channel_norms`; ``None`` gives plain K-only PCA.

    Returns
    -------
    covariance : Tensor
        ``[B, H, d, d]`` fp32, symmetric; with ``query_norms``, ``C ⊙ q̄q̄ᵀ`` plus the ridge.
    mean : Tensor
        ``[B, H, d]`` fp32, ``μ`` over the real tokens (zero for a row with none).
    """
    if key_mask is None:
        key_mask = _all_true(keys)
    per_head = key_mask if key_mask.dim() == 3 else key_mask[:, None, :]  # [B, 1|H, S]
    weight = per_head[..., None].to(keys.dtype)  # [B, 1|H, S, 1]
    count = per_head.sum(dim=-1, keepdim=True).float().clamp_min(1.0)  # [B, 1|H, 1]
    mean = (keys * weight).sum(dim=2, dtype=torch.float32) / count  # [B, H, d]
    # Centred about μ' = μ as the Keys' dtype holds it (no fp32 copy of the Keys), then corrected:
    #   Σ (k − μ)(k − μ)ᵀ = Σ (k − μ')(k − μ')ᵀ − n (μ' − μ)(μ' − μ)ᵀ
    shift = mean.to(keys.dtype)
    batch, heads, length, dim = keys.shape
    centred = keys.new_zeros(batch, heads, -(-length // GRAM_CHUNK) * GRAM_CHUNK, dim)  # whole chunks, 0 after S
    torch.mul(keys - shift[:, :, None, :], weight, out=centred[:, :, :length])
    cov = covariance_about_mean(_gram(centred), count, shift, mean)  # [B, H, d, d]
    return (cov if query_norms is None else weight_covariance(cov, query_norms)), mean


def covariance_about_mean(gram: Tensor, count: Tensor, shift: Tensor, mean: Tensor) -> Tensor:
    """``Σ (k − μ)(k − μ)ᵀ`` from the Gram matrix ``Σ (k − μ')(k − μ')ᵀ`` of the Keys centred about
    ``shift`` ``μ'`` (``μ`` as the Keys' dtype holds it), symmetrised:
    ``gram − n (μ' − μ)(μ' − μ)ᵀ``. ``gram`` ``[..., d, d]`` fp32, ``count`` ``[..., 1]`` (``n``),
    ``shift``, ``mean`` ``[..., d]`` → ``[..., d, d]`` fp32."""
    offset = shift.float() - mean  # 0 for fp32 Keys
    cov = gram - count[..., None] * (offset[..., :, None] * offset[..., None, :])
    return (cov + cov.transpose(-1, -2)) / 2


def weight_covariance(covariance: Tensor, query_norms: Tensor) -> Tensor:
    """``C ⊙ q̄q̄ᵀ`` plus the ridge: ``[B, H, d, d]`` and ``q̄`` ``[B, H, d]`` → ``[B, H, d, d]`` fp32."""
    qn = query_norms.float()
    cov = covariance * (qn[..., :, None] * qn[..., None, :])
    ridge = COVARIANCE_RIDGE * cov.diagonal(dim1=-2, dim2=-1).abs().mean(dim=-1)  # [B, H]
    return _add_to_diagonal_(cov, ridge)


def _add_to_diagonal_(matrices: Tensor, values: Tensor | float) -> Tensor:
    """``M + v·I`` in place, for ``matrices`` ``[..., n, n]`` and ``values`` ``[...]`` (one per
    matrix) or a number: no identity matrix is built (one launch on a GPU, not three)."""
    matrices.diagonal(dim1=-2, dim2=-1).add_(values[..., None] if isinstance(values, Tensor) else values)
    return matrices


def basis_attention_error(queries: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor], scale: float,
                          rotations: Tensor) -> Tensor:
    """How far each basis moves the queries' attention over the span, per row and KV head.

    ``queries`` ``[B, Hq, Q, d]``, ``keys``/``values`` ``[B, H, S, d|dv]`` (the span's tokens) with
    ``mask`` ``[B, S]`` (``None``: every slot is a real token), ``rotations`` ``[n, B, H, d, r]``
    (``n`` candidate bases) → ``[n, B, H]``: ``Σ‖O − O_ref‖² / Σ‖O_ref‖²`` over the group's queries,
    with ``O`` the attention output when each span Key reads ``RRᵀ(k − μ) + μ`` (what decode's
    logits see) and ``O_ref`` the exact one.
    """
    # With a basis, a logit is q·(RRᵀ(k − μ) + μ) = (RRᵀq)·k + c(q), c(q) = q·μ − (RRᵀq)·μ the same
    # for every Key: the softmax over the span drops it, so O is the attention of the projected query
    # RRᵀq over the span's own Keys. The projected queries of every basis are stacked after q as
    # more query rows: one fused attention call over the Keys and Values as they are (no copy of
    # them per basis) gives O_ref and every O, in flash attention when there is no padding mask.
    count, batch, kv_heads, dim, _ = rotations.shape
    q = queries.float().reshape(batch, kv_heads, -1, dim)  # [B, H, G·Q, d]: each group's rows
    projected = (q @ rotations) @ rotations.transpose(-1, -2)  # [n, B, H, G·Q, d]
    rows = q.shape[2]
    q_all = torch.cat([q[None], projected]).movedim(0, 2).flatten(2, 3).to(keys.dtype)  # [B, H, (1+n)·G·Q, d]
    visible = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, S]
    with sdpa_kernel(_FEW_QUERIES_BACKENDS):
        out = torch.nn.functional.scaled_dot_product_attention(q_all, keys, values, attn_mask=visible, scale=scale)
    out = out.float().unflatten(2, (1 + count, rows)).movedim(2, 0)  # [1+n, B, H, G·Q, dv]
    if mask is not None:
        out = out.nan_to_num(0.0)  # a row without span tokens
    exact = out[0]
    errors = (out[1:] - exact).square().sum(dim=(-2, -1))  # [n, B, H]
    return errors / exact.square().sum(dim=(-2, -1)).clamp_min(1e-30)


# SDPA backends for a window's queries over a long span, in the order tried: flash attention when
# there is no padding mask and the head dims agree, else memory-efficient attention, else math.
_FEW_QUERIES_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Token chunk of :func:`_long_product`: a product whose reduction runs over the tokens (S in the
# tens of thousands) and whose output is small (a [d, S]·[S, d] Gram matrix) leaves most of a GPU
# idle (3.2 ms per layer for the Gram matrix at 64k tokens
# on an H200); chunks of this many tokens make S/chunk products per matrix, summed after.
GRAM_CHUNK = 1024


def _long_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (:func:`_fp32_product`) for ``a`` ``[..., M, S]``, ``b`` ``[..., S, N]`` with a long
    ``S``, summed by token chunks."""
    length = a.shape[-1]
    whole = length // GRAM_CHUNK * GRAM_CHUNK
    if whole <= GRAM_CHUNK:
        return _fp32_product(a, b)
    chunks = whole // GRAM_CHUNK
    left = a[..., :whole].unflatten(-1, (chunks, GRAM_CHUNK)).movedim(-2, -3)  # [..., C, M, chunk]
    right = b[..., :whole, :].unflatten(-2, (chunks, GRAM_CHUNK))  # [..., C, chunk, N]
    out = _fp32_product(left, right).sum(dim=-3)
    return out if whole == length else out + _fp32_product(a[..., whole:], b[..., whole:, :])


def _gram(x: Tensor) -> Tensor:
    """``xᵀx`` over the token dim: ``[B, H, S, d]`` → ``[B, H, d, d]``, at least fp32."""
    return _long_product(x.transpose(-1, -2), x)


def _fp32_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in at least fp32. Half-precision operands on a GPU are multiplied as they are, on
    tensor cores, accumulating into an fp32 result (no fp32 copies; their products are exact in
    fp32, so this equals the fp32 product up to the order of the sums); elsewhere both are promoted."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        left = a.expand(*batch, *a.shape[-2:]).reshape(math.prod(batch), *a.shape[-2:])
        right = b.expand(*batch, *b.shape[-2:]).reshape(math.prod(batch), *b.shape[-2:])
        return torch.bmm(left, right, out_dtype=torch.float32).view(*batch, a.shape[-2], b.shape[-1])
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(dtype)


def top_eigenvectors(covariance: Tensor, rank: int) -> Tensor:
    """Exact top-``rank`` eigenvectors, by eigenvalue descending.

    ``covariance`` ``[..., d, d]`` symmetric → ``[..., d, rank]`` fp32 orthonormal columns.
    """
    _, vectors = torch.linalg.eigh(covariance.float())  # ascending
    return vectors[..., -rank:].flip(-1).contiguous()


# Shift of the spectrum in subspace iteration, relative to the mean eigenvalue: C + δI has C's
# eigenvectors and keeps each step's Y = (C + δI)X of full rank, with cond(Y) ≤ d/δ (≈ 1e6).
SUBSPACE_SHIFT = 1e-4


def subspace_iteration(covariance: Tensor, rank: int, iters: int = 5) -> Tensor:
    """Top-``rank`` invariant subspace by block power iteration with Cholesky orthonormalisation,
    queued on the device without reading anything back to the host.

    Starts from the ``rank`` coordinate axes of largest variance; each step is ``Y = (C + δI) X``
    (same eigenvectors as ``C``), ``X = Y L⁻ᵀ`` with ``L Lᵀ = YᵀY`` (shifted CholeskyQR3, see
    :func:`_cholesky_orthonormalise`), which keeps ``cond(Y) ≤ d/δ`` within what fp32 factorises.
    Plain Cholesky orthonormalisation (the official solver's) broke down for a fifth of the bases
    of a 32-layer model's prefill (spectra spread over many orders of magnitude). A covariance
    without variance (a head without span tokens: any basis is exact for it) iterates the identity
    and keeps the start axes. A basis whose factorisation still fails (non-finite Keys) is replaced
    by its start axes, selected on the device: no host synchronisation, so a prefill's compression
    can be queued behind its later layers (:mod:`rotatek_compile.prefill`).

    The result spans the same subspace as :func:`top_eigenvectors`' columns (decode reads only
    the subspace: ``K R`` and ``q R``), in no particular column order.

    ``covariance`` ``[..., d, d]`` → ``[..., d, rank]`` fp32 orthonormal columns.
    """
    cov = covariance.float()
    variances = cov.diagonal(dim1=-2, dim2=-1)  # [..., d]
    mean_variance = variances.mean(dim=-1)  # [...]
    # C + δI, and I where C = 0
    shifted = _add_to_diagonal_(cov.clone(), SUBSPACE_SHIFT * mean_variance + (mean_variance == 0))
    start = variances.topk(rank, dim=-1).indices  # [..., r]
    start = torch.zeros(*cov.shape[:-1], rank, device=cov.device).scatter_(-2, start[..., None, :], 1.0)  # [..., d, r]
    basis, good = start, torch.ones(cov.shape[:-2], dtype=torch.bool, device=cov.device)
    for _ in range(iters):
        basis, converged = _cholesky_orthonormalise(shifted @ basis)
        good &= converged
    if logger.isEnabledFor(logging.DEBUG) and not bool(good.all()):  # a host read: only when asked for
        logger.debug("rotatek: Cholesky orthonormalisation broke down for %d of %d bases; they keep their "
                     "start axes", int((~good).sum()), good.numel())
    return torch.where(good[..., None, None], basis.nan_to_num(0.0), start).contiguous()


def _cholesky_orthonormalise(block: Tensor) -> tuple[Tensor, Tensor]:
    """``Y`` ``[..., d, r]`` → ``X`` with orthonormal columns spanning it, and ``[...]`` bool: where
    that worked (every factorisation succeeded and ``XᵀX = I`` to 1e-3).

    Shifted CholeskyQR3 (Fukaya et al., 2020): a first pass factorises ``YᵀY + sI`` with
    ``s = 11(dr + r(r+1))·u·‖Y‖²_F``, which succeeds in fp32 for any ``Y`` and leaves ``X = Y L⁻ᵀ``
    conditioned well enough for two plain passes to make it orthonormal, for ``cond(Y)`` up to
    about ``1/u`` (plain CholeskyQR: about ``1/√u``)."""
    dim, rank = block.shape[-2:]
    unit = torch.finfo(torch.float32).eps / 2
    shift = 11 * (dim * rank + rank * (rank + 1)) * unit * block.square().sum(dim=(-2, -1))  # [...]
    basis, good = _cholesky_pass(block, shift)
    for _ in range(2):
        basis, passed = _cholesky_pass(basis)
        good &= passed
    departure = _add_to_diagonal_(basis.transpose(-1, -2) @ basis, -1.0)  # XᵀX − I
    error = departure.abs().amax(dim=(-2, -1)).nan_to_num(float("inf"))
    return basis, good & (error < 1e-3)


def _cholesky_pass(block: Tensor, shift: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One CholeskyQR pass: ``X = Y L⁻ᵀ`` with ``L Lᵀ = YᵀY (+ sI)``, and where ``L`` exists."""
    gram = block.transpose(-1, -2) @ block  # [..., r, r]
    if shift is not None:
        _add_to_diagonal_(gram, shift)
    factor, info = torch.linalg.cholesky_ex(gram)
    # X = Y L⁻ᵀ  ⇔  Xᵀ = L⁻¹ Yᵀ
    basis = torch.linalg.solve_triangular(factor, block.transpose(-1, -2), upper=False).transpose(-1, -2)
    return basis, info == 0


def span_basis(
    keys: Tensor,
    rank: int,
    key_mask: Optional[Tensor] = None,
    queries: Optional[Tensor] = None,
    solver: str = "eigh",
    iters: int = 5,
) -> tuple[Tensor, Tensor]:
    """RotateK's basis for a span: ``R`` ``[B, H, d, r]`` and ``μ`` ``[B, H, d]`` (both fp32).

    ``queries`` ``[B, Hq, W, d]`` turns on the query-aware weighting; ``None`` is K-only PCA.
    """
    cov, mean = weighted_covariance(keys, key_mask, queries)
    return solve_basis(cov, rank, solver, iters), mean


def weighted_covariance(keys: Tensor, key_mask: Optional[Tensor] = None,
                        queries: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`span_covariance` weighted by the window ``queries``' channel norms (``None``: not
    weighted): ``C`` ``[B, H, d, d]`` and ``μ`` ``[B, H, d]``, fp32."""
    norms = None if queries is None else query_channel_norms(queries, keys.shape[1])
    return span_covariance(keys, key_mask, norms)


def solve_basis(covariance: Tensor, rank: int, solver: str = "eigh", iters: int = 5) -> Tensor:
    """The top-``rank`` eigenvectors of ``covariance`` ``[..., d, d]`` → ``[..., d, rank]`` fp32, by
    ``solver``: ``"eigh"`` (exact) or ``"subspace"`` (``iters`` steps of subspace iteration)."""
    if solver == "eigh":
        return top_eigenvectors(covariance, rank)
    if solver == "subspace":
        return subspace_iteration(covariance, rank, iters)
    raise ValueError(f"rotatek option solver={solver!r} is invalid: expected 'eigh' or 'subspace'")


def stored_basis(rotation: Tensor, mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The basis as the cache keeps it: ``R̂ = R`` rounded to ``dtype`` and ``δμ = μ − (μR̂)R̂ᵀ``.

    ``rotation`` ``[..., d, r]``, ``mean`` ``[..., d]`` (fp32) → ``R̂`` ``[..., d, r]`` and ``δμ``
    ``[..., d]`` in ``dtype``; ``δμ`` is computed (in fp32) from the ``R̂`` that decode reads, so
    that at ``r = d``, where ``logit = q·k − q(I − R̂R̂ᵀ)(k − μ)``, only ``R̂``'s departure from
    orthogonality is lost (none in fp32). Any leading dims: all layers' bases go in one call.
    """
    stored = rotation.to(dtype)
    rounded = stored.float()
    residual = mean.float() - ((mean.float()[..., None, :] @ rounded) @ rounded.transpose(-1, -2))[..., 0, :]
    return stored, residual.to(dtype)


def project_span(keys: Tensor, stored_rotation: Tensor) -> Tensor:
    """``K̃ = K R̂``: ``[B, H, S, d]`` · ``[B, H, d, r]`` → ``[B, H, S, r]`` in the Keys' dtype (a GPU
    product of bf16 or fp16 accumulates in fp32)."""
    return keys @ stored_rotation.to(keys.dtype)


def compress_span(keys: Tensor, rotation: Tensor, mean: Tensor) -> CompressedSpan:
    """Project the span's Keys onto the basis and keep the mean's lost part.

    ``keys`` ``[B, H, S, d]``, ``rotation`` ``[B, H, d, r]``, ``mean`` ``[B, H, d]`` →
    ``K̃ = K R̂`` ``[B, H, S, r]``, ``R̂`` ``[B, H, d, r]`` and ``δμ`` ``[B, H, d]``, all in the Keys'
    dtype (:func:`stored_basis`).
    """
    stored, residual = stored_basis(rotation, mean, keys.dtype)
    return CompressedSpan(project_span(keys, stored), stored, residual)


def rotatek_compress(
    keys: Tensor,
    rank: int,
    key_mask: Optional[Tensor] = None,
    queries: Optional[Tensor] = None,
    solver: str = "eigh",
    iters: int = 5,
) -> CompressedSpan:
    """:func:`span_basis` then :func:`compress_span`: the whole prefill step of RotateK."""
    rotation, mean = span_basis(keys, rank, key_mask, queries, solver, iters)
    return compress_span(keys, rotation, mean)


def decode_attention(
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
    """Attention of the newest tokens over a mixed cache, by one softmax over both segments.

    Parameters
    ----------
    query : Tensor
        ``[B, Hq, d]``: the new token's post-RoPE query (a decode step), or ``[B, Hq, T, d]``:
        ``T`` new tokens appended at once (a chunk: teacher forcing, a second prompt turn).
    span_keys, rotation, mean_residual : Tensor
        The compressed span: ``K̃`` ``[B, H, Sv, r]``, ``R`` ``[B, H, d, r]``, ``δμ`` ``[B, H, d]``.
    span_values : Tensor
        ``[B, H, Sv, dv]``.
    span_mask : Tensor
        ``[B, Sv]`` bool.
    keys, values : Tensor
        The full-channel segment (prompt, text, generated): ``[B, H, Sf, d]``, ``[B, H, Sf, dv]``.
        Its last ``T`` tokens are the queries' own; query ``t`` sees those up to itself (causal).
    mask : Tensor
        ``[B, Sf]`` bool.
    scale : float
        Softmax scale (``1/sqrt(d)`` in most models).

    Returns
    -------
    Tensor
        ``[B, Hq, dv]`` (or ``[B, Hq, T, dv]``) in ``query``'s dtype. A query whose tokens are all
        masked gives zeros.
    """
    q = _group_queries(query, keys.shape[1]) * scale  # [B, H, G·T, d], scaled: logits come out scaled
    q_rot = q @ rotation.float()  # [B, H, G·T, r]
    span_logits = q_rot @ span_keys.float().transpose(-1, -2)  # [B, H, G·T, Sv]
    span_logits += (q * mean_residual.float()[:, :, None, :]).sum(-1, keepdim=True)
    out = attend_two_segments(q, span_logits, span_values, span_mask, keys, values, mask,
                              new_tokens=_new_tokens(query))
    return _ungroup(out, query)


def _new_tokens(query: Tensor) -> int:
    return 1 if query.dim() == 3 else query.shape[2]


def _group_queries(query: Tensor, kv_heads: int) -> Tensor:
    """``[B, Hq, d]`` or ``[B, Hq, T, d]`` → fp32 ``[B, H, G·T, d]``: each KV head's query rows,
    ordered (query head of the group, new token)."""
    return query.float().reshape(query.shape[0], kv_heads, -1, query.shape[-1])


def _ungroup(out: Tensor, query: Tensor) -> Tensor:
    """``[B, H, G·T, dv]`` → ``query``'s layout (``[B, Hq, dv]`` or ``[B, Hq, T, dv]``) and dtype."""
    return out.reshape(*query.shape[:-1], out.shape[-1]).to(query.dtype)


def attend_two_segments(q: Tensor, span_logits: Tensor, span_values: Tensor, span_mask: Tensor,
                        keys: Tensor, values: Tensor, mask: Tensor, new_tokens: int = 1) -> Tensor:
    """One softmax over ``[span | full]`` logits; each segment's Values are read where they lie.

    ``q`` ``[B, H, G·T, d]`` fp32, already multiplied by the softmax scale (rows ordered (group
    member, new token), ``T = new_tokens``); ``span_logits`` ``[B, H, G·T, Sv]`` from that ``q``
    (overwritten) → ``[B, H, G·T, dv]`` fp32. The last ``T`` tokens of the full segment are the new
    ones, seen causally. Softmax over the two blocks without joining them::

        m = max over both blocks ;  p = exp(logits − m) per block
        out = (p_span·V_span + p_full·V_full) / (Σ p_span + Σ p_full)

    computed in place on the two logit blocks: attention copies none of the cache. A query whose
    tokens are all masked gives zeros.
    """
    full_logits = q @ keys.float().transpose(-1, -2)  # [B, H, G·T, Sf]
    full_valid = mask[:, None, None, :]  # [B, 1, 1, Sf]
    if new_tokens > 1:
        full_valid = full_valid & _causal_tail(mask.shape[-1], new_tokens, q.shape[2] // new_tokens, mask.device)
    blocks = [(span_logits, span_mask[:, None, None, :], span_values), (full_logits, full_valid, values)]
    peak = torch.full_like(q[..., :1], -math.inf)  # [B, H, G·T, 1]
    for logits, valid, _ in blocks:
        logits.masked_fill_(~valid, -math.inf)
        if logits.shape[-1]:
            peak = torch.maximum(peak, logits.amax(-1, keepdim=True))
    peak = peak.nan_to_num(0.0, neginf=0.0)  # all masked: every exp below is 0
    out, total = 0.0, 0.0
    for logits, _, block_values in blocks:
        probs = logits.sub_(peak).exp_()
        total = total + probs.sum(-1, keepdim=True)
        out = out + probs @ block_values.float()  # [B, H, G·T, dv]
    return out / total.clamp_min(torch.finfo(torch.float32).tiny)


def _causal_tail(length: int, new_tokens: int, group: int, device: torch.device) -> Tensor:
    """``[G·T, length]`` bool: new token ``t`` (the ``T`` last positions) sees positions ``≤ its own``."""
    own_position = length - new_tokens + torch.arange(new_tokens, device=device)  # [T]
    visible = torch.arange(length, device=device)[None, :] <= own_position[:, None]  # [T, length]
    return visible.repeat(group, 1)  # rows ordered (group member, new token)


# --- baselines at the same interface -----------------------------------------------------------


def think_channels(keys: Tensor, queries: Tensor, rank: int, key_mask: Optional[Tensor] = None) -> Tensor:
    """ThinK: per KV head, keep the ``rank`` channels of largest ``mean(Q_c²)·mean(K_c²)``.

    ``keys`` ``[B, H, S, d]``, ``queries`` ``[B, Hq, W, d]`` → channel indices ``[B, H, r]``
    (ascending). Used through :func:`selection_matrix` it runs on :func:`decode_attention` with
    ``δμ = 0`` (no rotation, no mean correction).
    """
    batch, kv_heads, _, dim = keys.shape
    if key_mask is None:
        key_mask = _all_true(keys)
    weight = key_mask[:, None, :, None].float()
    key_energy = (keys.float().square() * weight).sum(2) / weight.sum(2).clamp_min(1.0)  # [B, H, d]
    q_energy = queries.float().square().mean(dim=2)  # [B, Hq, d]
    q_energy = q_energy.view(batch, kv_heads, -1, dim).mean(dim=2)  # [B, H, d]
    return (q_energy * key_energy).topk(rank, dim=-1).indices.sort(dim=-1).values


def selection_matrix(channels: Tensor, dim: int) -> Tensor:
    """One-hot columns ``[B, H, d, r]`` fp32 that pick ``channels`` ``[B, H, r]`` out of ``d``."""
    rows = torch.arange(dim, device=channels.device)[:, None]  # [d, 1]
    return (rows == channels[..., None, :].long()).float()  # [B, H, d, r]


def think_basis(channels: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """ThinK's cache keeps only the ``r`` channel indices ``[B, H, r]``; at decode they become the
    basis :func:`decode_attention` reads with: ``R`` one-hot ``[B, H, d, r]``, ``δμ = 0`` ``[B, H, d]``."""
    rotation = selection_matrix(channels, dim)
    return rotation, rotation.new_zeros(*rotation.shape[:-1])


class SparseKeys(NamedTuple):
    """SparK-style per-token channel selection: what the cache keeps of each span token."""

    values: Tensor  # [B, H, S, r] the kept channels' values (Keys' dtype)
    channels: Tensor  # [B, H, S, r] their indices (int16)
    fill: Tensor  # [B, H, S] mean of the pruned channels (Keys' dtype)


def spark_select(keys: Tensor, queries: Tensor, rank: int) -> SparseKeys:
    """SparK-style: per token keep the ``rank`` channels of largest ``|q̄_c|·K_c²``.

    ``keys`` ``[B, H, S, d]``, ``queries`` ``[B, Hq, W, d]``. Pruned channels are later filled with
    that token's mean over them (:func:`spark_reconstruct`).
    """
    batch, kv_heads, _, dim = keys.shape
    q_mag = queries.float().abs().mean(dim=2).view(batch, kv_heads, -1, dim).mean(dim=2)  # [B, H, d]
    score = q_mag[:, :, None, :] * keys.float().square()  # [B, H, S, d]
    channels = score.topk(rank, dim=-1).indices.sort(dim=-1).values  # [B, H, S, r]
    kept = keys.gather(-1, channels)
    total = keys.float().sum(-1)
    pruned_count = max(dim - rank, 1)
    fill = ((total - kept.float().sum(-1)) / pruned_count).to(keys.dtype)
    return SparseKeys(kept, channels.to(torch.int16), fill)


def sparse_span_logits(q: Tensor, sparse: SparseKeys) -> Tensor:
    """``q·k_s`` for SparK-style span tokens, read off what the cache keeps.

    ``k_s`` is ``fill_s`` on every channel except the kept ones, so
    ``q·k_s = fill_s·Σ_c q_c + Σ_j q[ch_sj]·(v_sj − fill_s)``.
    ``q`` ``[B, H, Q, d]`` fp32 (``Q`` query rows per KV head) → ``[B, H, Q, Sv]`` fp32. Of the
    two ways to evaluate it, the one with the smaller temporary runs: per query row, gather its
    ``Sv·r`` kept entries (``Q·Sv·r``), or rebuild the Keys to full width once (``Sv·d``).
    """
    batch, kv_heads, tokens, rank = sparse.channels.shape
    dim = q.shape[-1]
    if q.shape[2] * rank >= dim:  # many query rows (a chunk): rebuilding once is cheaper
        return q @ spark_reconstruct(sparse, dim).float().transpose(-1, -2)
    index = sparse.channels.long().view(batch, kv_heads, tokens * rank)  # [B, H, Sv·r]
    fill = sparse.fill.float()  # [B, H, Sv]
    offsets = sparse.values.float() - fill[..., None]  # [B, H, Sv, r]
    kept = [(q_row.gather(2, index).view(batch, kv_heads, tokens, rank) * offsets).sum(-1)  # [B, H, Sv]
            for q_row in q.unbind(2)]  # one query row at a time: [B, H, d]
    return torch.stack(kept, dim=2) + q.sum(-1, keepdim=True) * fill[:, :, None, :]  # [B, H, Q, Sv]


def sparse_decode_attention(query: Tensor, span_key_values: Tensor, span_key_channels: Tensor,
                            span_key_fill: Tensor, span_values: Tensor, span_mask: Tensor, keys: Tensor,
                            values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """:func:`decode_attention` for a SparK-style span (:class:`SparseKeys`), same shapes."""
    q = _group_queries(query, keys.shape[1]) * scale  # [B, H, G·T, d], scaled
    span_logits = sparse_span_logits(q, SparseKeys(span_key_values, span_key_channels, span_key_fill))
    out = attend_two_segments(q, span_logits, span_values, span_mask, keys, values, mask,
                              new_tokens=_new_tokens(query))
    return _ungroup(out, query)


def spark_reconstruct(sparse: SparseKeys, dim: int) -> Tensor:
    """Full-width Keys ``[B, H, S, d]``: kept channels as stored, the rest set to the fill value."""
    full = sparse.fill[..., None].expand(*sparse.fill.shape, dim).clone()
    return full.scatter(-1, sparse.channels.long(), sparse.values)


def token_scores(queries: Tensor, keys: Tensor, scale: float, key_mask: Optional[Tensor] = None) -> Tensor:
    """Attention mass each span token gets from the window (FastV/SnapKV-style).

    ``queries`` ``[B, Hq, W, d]``, ``keys`` ``[B, H, S, d]`` → ``[B, H, S]`` fp32: softmax over the
    span of the window's logits, summed over the window and the head's query group.
    """
    batch, kv_heads, _, dim = keys.shape
    q = queries.to(keys.dtype).reshape(batch, kv_heads, -1, dim)  # [B, H, G·W, d]: each group's rows
    logits = _fp32_product(q, keys.transpose(-1, -2)).mul_(scale)  # [B, H, G·W, S] fp32
    if key_mask is not None:
        logits.masked_fill_(~key_mask[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=2)


def keep_tokens(scores: Tensor, keep: float, key_mask: Optional[Tensor] = None,
                min_width: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of the span tokens to keep, per KV head, and which of them are real.

    ``scores`` ``[B, H, S]`` → ``indices`` ``[B, H, k]`` (ascending positions) and ``kept_mask``
    ``[B, k]`` with ``k = max(ceil(keep · max real tokens), min(min_width, S))``; row ``b`` keeps
    ``ceil(keep · n_b)``.
    """
    batch, _, length = scores.shape
    if key_mask is None:
        key_mask = torch.ones(batch, length, dtype=torch.bool, device=scores.device)
    real = key_mask.sum(-1)  # [B]
    kept = torch.ceil(real.float() * keep).long().clamp(max=length)  # [B]
    width = max(int(kept.max().item()) if batch else 0, min(min_width, length))
    masked = scores.masked_fill(~key_mask[:, None, :], -math.inf)
    kept_mask = torch.arange(width, device=scores.device)[None, :] < kept[:, None]  # [B, k]
    # Take the `width` best by score; in rows that keep fewer, push the surplus past the end
    # (sentinel `length`) so that after sorting the real picks come first, in position order.
    ranked = masked.topk(width, dim=-1).indices  # [B, H, k]
    ranked = torch.where(kept_mask[:, None, :], ranked, torch.full_like(ranked, length))
    indices = ranked.sort(dim=-1).values.clamp(max=max(length - 1, 0))
    return indices, kept_mask


def gather_tokens(tensor: Tensor, indices: Tensor) -> Tensor:
    """``tensor`` ``[B, H, S, x]`` gathered along ``S`` by ``indices`` ``[B, H, k]`` → ``[B, H, k, x]``."""
    return tensor.gather(2, indices[..., None].expand(*indices.shape, tensor.shape[-1]))
