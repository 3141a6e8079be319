"""Which span tokens stay exact, which are compressed, which are dropped.

Two rules: the attention sinks (below) never enter the compressed span, for every method; and
under ``kv_budget`` the span is split into an exact tier, a RotateK tier and a dropped tail
(:func:`choose_split`, further down).

A few tokens take most of the attention in many layers ("attention sinks": the first token of a
prompt, a delimiter, ViT register-like tokens of an image span). A rank-``r`` basis shared by
thousands of span tokens barely sees such a lone outlier, and every later query attends to it, so
compressing it costs far more than its share of the bytes. Measured on SmolLM2-135M real weights
(``docs/fidelity.md``): token 0 takes 47–98% of the window's attention over the prompt in layers
12–29, and a delimiter ~25–47 tokens in takes 20–83% in layers 3–10; on Gemma-3-270M token 0
takes 48–62% in the global layers. Their Keys are *not* large (0.25–1.2× the median span Key norm
on SmolLM2), so a Key-norm rule would miss them; the rule reads the attention itself.

The rule, per batch row (every method, every span kind)::

    share_h(s) = mean over the window's queries of KV head h's group of softmax_span(q·k_s·scale)
    sinks      = {first real token of the row, if in the span}
               ∪ {the SINK_LIMIT - 1 span tokens of largest max_h share_h(s), those with
                  share ≥ max(SINK_SHARE, SINK_FACTOR / n)}       (n: the row's span tokens)

and in a batch every row takes as many sinks as the row with the most (the next tokens by share):
segments are as wide as their widest row, so equal counts cost no padding slots.

A sink leaves the compressed span and joins the exact (full-width) rest segment of the cache, so
the decode kernel does not change and the row keeps every token it had.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from rotatek_compile import kernels
from rotatek_compile.kernels import reference

# A span token with at least this share of some KV head's window attention is a sink. Uniform
# attention over a 1000-token span gives 0.001 per token; the sinks measured take 0.2–0.98.
SINK_SHARE = 0.1
# ... and at least this many times the uniform share 1/n: in a short span (under 100 tokens) every
# token has a large share without standing out.
SINK_FACTOR = 10.0
# At most this many sinks per row and layer (the first real token included): each costs d - r Key
# elements more than a compressed token.
SINK_LIMIT = 4


def window_share(queries: Tensor, keys: Tensor, scale: float, span: Tensor, kernel: str = "auto") -> Tensor:
    """Mean attention probability each span token gets from the window's queries.

    ``queries`` ``[B, Hq, W, d]``, ``keys`` ``[B, H, S, d]``, ``span`` ``[B, S]`` bool →
    ``[B, H, S]`` fp32: per KV head, the softmax over the span tokens of each window query of the
    head's group, averaged over those ``G·W`` queries (a row sums to 1 over its span, 0 elsewhere).
    On CUDA the fused kernel computes it unless ``kernel="reference"`` (the option of that name).
    """
    fused = kernels.compress_kernels(keys.device, kernel)
    if fused is not None:
        return fused.window_share_triton(queries, keys, scale, span)
    group_queries = queries.shape[1] // keys.shape[1] * queries.shape[2]  # G·W
    return reference.token_scores(queries, keys, scale, span) / group_queries


def attention_sinks(queries: Tensor, keys: Tensor, scale: float, span: Tensor, valid: Tensor) -> Tensor:
    """The span tokens that stay exact (see the module docstring for the rule).

    Parameters
    ----------
    queries : Tensor
        ``[B, Hq, W, d]`` post-RoPE queries of the last ``W`` prompt tokens.
    keys : Tensor
        ``[B, H, S, d]`` post-RoPE Keys of the whole prompt.
    scale : float
        The layer's softmax scale.
    span : Tensor
        ``[B, S]`` bool, the tokens to compress (real tokens only).
    valid : Tensor
        ``[B, S]`` bool, the real tokens (left padding is ``False``).

    Returns
    -------
    Tensor
        ``[B, S]`` bool, a subset of ``span`` with at most :data:`SINK_LIMIT` tokens per row, the
        same number in every row (as far as its span has tokens).
    """
    return sinks_by_share(window_share(queries, keys, scale, span).amax(dim=1), span, valid)


def sinks_by_share(share: Tensor, span: Tensor, valid: Tensor) -> Tensor:
    """:func:`attention_sinks` from each token's largest window share over the KV heads.

    ``share`` ``[..., B, S]`` (``max_h share_h``), ``span`` and ``valid`` ``[..., B, S]`` bool →
    ``[..., B, S]`` bool; leading dims (layers) are independent: one call decides every layer.
    """
    length = span.shape[-1]
    first = valid.int().argmax(dim=-1, keepdim=True)  # [..., B, 1] first real token (0 for a row with none)
    sinks = torch.zeros_like(span).scatter_(-1, first, span.gather(-1, first))
    extra = min(SINK_LIMIT - 1, length)
    if extra <= 0:
        return sinks
    share = share.masked_fill(sinks | ~span, -1.0)
    top, where = share.topk(extra, dim=-1)  # [..., B, extra], by share descending
    threshold = (SINK_FACTOR / span.sum(dim=-1, keepdim=True).clamp_min(1)).clamp_min(SINK_SHARE)  # [..., B, 1]
    outliers = (top >= threshold).sum(dim=-1, keepdim=True).amax(dim=-2, keepdim=True)  # the most a row has
    taken = (torch.arange(extra, device=span.device) < outliers) & (top >= 0)  # [..., B, extra] real span tokens
    return sinks | torch.zeros_like(span).scatter_(-1, where, taken)


# --- the tiered cache under one byte budget (``kv_budget``) ---------------------------------------
#
# Per layer and batch row, the span's tokens (sinks aside) are ranked per KV head by their window
# attention share; the first E_b of each head's ranking stay exact (rest segment, full width), the
# next T_b are rotated to r channels (RotateK, basis over that tier), the others are dropped:
#
#     stored = B·H·(W_rest·(d+dv) + W_rot·(r+dv) + d·r + d)·elt + B·(W_rest + W_rot)    (masks)
#     W_rest = max(2, max_b(m_b + s_b + E_b)),  W_rot = max(2, max_b T_b)
#     stored ≤ Σ_b m_b·H·(d+dv)·elt + β·Σ_b n_b·H·(d+dv)·elt                           (the budget)
#
# with m_b the row's real tokens outside the span, n_b its span tokens, s_b its sinks. The basis
# (d·r + d per head) is stored whatever the split: the decode graph's state has one layout.
# Candidates: T_b = ⌊t·(n_b − s_b)⌋ for t in ROTATED_FRACTIONS, each with the largest E_b that
# fits; t = 0 is token-only, t = 1 (if it fits) RotateK on every token.
#
# Choice (:func:`choose_split`): the window's queries are split in halves; each half ranks the
# tokens and fits the rotated tier's basis, the other half measures the attention-output error
# over the span (:func:`split_error`), and the two errors are averaged. Measured in-sample (one
# half ranking *and* judging), the error favours dropping: the tokens a query set ranks low are
# by construction those it barely attends to, while later queries do attend to them. Among the
# candidates within TIE_TOLERANCE of the smallest error, the one that rotates the most tokens is
# taken (rotating rather than dropping keeps an approximation of every token for later queries).
# Fitted on 4 tuning prompts (benchmarks/fidelity_prompts.py seed 7, SmolLM2) against the attention
# error of the prompts' continuation queries, layer by layer: over the best fixed split, this rule
# cut that error by 1 / 5 / 11 / 18% at budgets 0.25 / 0.4 / 0.5 / 0.63 (the in-sample error
# alone: 0 to 1%).

ROTATED_FRACTIONS = tuple(i / 8 for i in range(9))
TIE_TOLERANCE = 1.25
# The tie rule: "most rotated" had the lower mean KL and geo-mean of per-prompt KL ratios to
# token-only than "least rotated" at every budget of both models on fidelity.py's tuning prompts
# (benchmarks/tiered_rule.py; docs/fidelity.md).
SPLIT_RULE = "most rotated"
# Which queries judge a split (:func:`choose_split`): "both halves" (each half of the window ranks
# and fits, the other half judges, the two errors averaged) or "later half" (the first half ranks
# and fits, the later half judges: the continuation's queries come after the whole window).
JUDGINGS = ("both halves", "later half")
JUDGING = "both halves"
# Which of a split's kept tokens (each head's first E_b + T_b by window share) stay exact
# (:func:`exact_first`): "largest share", the first E_b; or "share × rotation error", the E_b whose
# rotation would move the attention output most, to first order (a token's weight in the output
# times the logit error rotating it makes):
#
#     score_s = share_s · rms_q |q·(I − R₀R₀ᵀ)(k_s − μ₀)|·scale      (R₀, μ₀: rank-r K-only PCA of the span)
#
# so a well-attended token that the rank-r basis reproduces well is rotated, and one it does not
# stays exact in its place. One basis per window half serves every candidate split.
EXACT_TIERS = ("largest share", "share × rotation error")
EXACT_TIER = "largest share"


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one layer's cache stores per row, for the byte count of a candidate split."""

    heads: int
    head_dim: int
    value_dim: int
    rank: int
    element: int  # bytes per element of the cache dtype
    outside: tuple[int, ...]  # m_b + s_b: real tokens outside the span, plus the sinks
    min_segment: int

    def stored_bytes(self, exact: list[int], rotated: list[int]) -> int:
        """Bytes of every tensor the layer keeps (Keys, basis, Values, masks) with ``exact[b]`` and
        ``rotated[b]`` span tokens per row."""
        rest = max(self.min_segment, max(m + e for m, e in zip(self.outside, exact)))
        rot = max(self.min_segment, max(rotated))
        rows = len(self.outside)
        d, dv, r = self.head_dim, self.value_dim, self.rank
        per_head = rest * (d + dv) + rot * (r + dv) + d * r + d
        return rows * self.heads * per_head * self.element + rows * (rest + rot)


@dataclasses.dataclass(frozen=True)
class Split:
    """Per row: span tokens kept exact (beyond the sinks) and rotated; the rest are dropped."""

    rotated_fraction: float
    exact: tuple[int, ...]
    rotated: tuple[int, ...]
    stored_bytes: int
    error: float = math.nan
    query_aware: bool = True  # the rotated tier's basis: query-aware RotateK, or K-only PCA


def candidate_splits(layout: Layout, candidates: list[int], allowed: int) -> list[Split]:
    """Every split of :data:`ROTATED_FRACTIONS` that fits ``allowed`` stored bytes.

    ``candidates[b]``: span tokens of row ``b`` that are not sinks. For each rotated fraction, the
    exact tier takes the largest common fraction of every row's tokens that still fits (bisection:
    the byte count grows with it).
    """
    splits = []
    for t in ROTATED_FRACTIONS:
        rotated = [math.floor(t * c) for c in candidates]

        def exact_at(f: float) -> list[int]:
            return [min(c - r, math.floor(f * c)) for c, r in zip(candidates, rotated)]

        if layout.stored_bytes(exact_at(0.0), rotated) > allowed:
            continue
        low, high = 0.0, 1.0
        if layout.stored_bytes(exact_at(high), rotated) <= allowed:
            low = high
        else:
            for _ in range(40):  # to below one token in rows of up to 2^40 tokens
                middle = (low + high) / 2
                low, high = (middle, high) if layout.stored_bytes(exact_at(middle), rotated) <= allowed else (low, middle)
        exact = exact_at(low)
        splits.append(Split(t, tuple(exact), tuple(rotated), layout.stored_bytes(exact, rotated)))
    return splits


def ranking(share: Tensor, mask: Tensor) -> Tensor:
    """``[B, H, N]`` token indices, each head's best share first, padding (``mask`` ``[B, N]``) last."""
    return share.masked_fill(~mask[:, None, :], -1.0).argsort(dim=-1, descending=True, stable=True)


def tier_masks(order: Tensor, exact: tuple[int, ...], rotated: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``[B, H, N]`` bool masks of the exact and rotated tiers, from each head's ranking ``order``
    ``[B, H, N]`` (token indices, best first) and the per-row tier sizes."""
    rank_of = torch.empty_like(order)
    rank_of.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    exact_t = torch.tensor(exact, device=order.device)[:, None, None]  # [B, 1, 1]
    rotated_t = torch.tensor(rotated, device=order.device)[:, None, None]
    return rank_of < exact_t, (rank_of >= exact_t) & (rank_of < exact_t + rotated_t)


def rotation_error(queries: Tensor, keys: Tensor, scale: float, mask: Tensor, rank: int) -> Tensor:
    """Per span token, the rms over its KV head's group of window queries of the logit error that
    rank-``rank`` K-only PCA of the span makes: ``queries`` ``[B, Hq, W, d]``, ``keys``
    ``[B, H, N, d]``, ``mask`` ``[B, N]`` → ``[B, H, N]`` fp32 (0 at padding)."""
    batch, heads, _, dim = keys.shape
    rotation, mean = reference.span_basis(keys, rank, mask[:, None, :].expand(-1, heads, -1))  # [B, H, d, r], [B, H, d]
    centred = keys.float() - mean[:, :, None, :]
    residual = centred - (centred @ rotation) @ rotation.transpose(-1, -2)  # [B, H, N, d]
    q = queries.float().reshape(batch, heads, -1, dim) * scale  # [B, H, G·W, d]
    error = (q @ residual.transpose(-1, -2)).square().mean(dim=2).sqrt()  # [B, H, N]
    return error.masked_fill(~mask[:, None, :], 0.0)


def exact_first(order: Tensor, score: Tensor, exact: tuple[int, ...], rotated: tuple[int, ...]) -> Tensor:
    """``order`` ``[B, H, N]`` (token indices, best share first) with each head's kept tokens, its
    first ``exact[b] + rotated[b]``, re-sorted by ``score`` ``[B, H, N]`` (≥ 0, per token), largest
    first (ties keep their share order); the dropped tokens stay where they were."""
    kept = torch.tensor([e + t for e, t in zip(exact, rotated)], device=order.device)[:, None, None]  # [B, 1, 1]
    position = torch.arange(order.shape[-1], device=order.device)
    ranked = score.gather(-1, order).nan_to_num(0.0).clamp_min(0.0)  # [B, H, N] each place's token's score
    key = torch.where(position < kept, ranked + 1.0, -(position + 1.0) / (order.shape[-1] + 1.0))
    return order.gather(-1, key.argsort(dim=-1, descending=True, stable=True))


def exact_tier_score(queries: Tensor, keys: Tensor, scale: float, mask: Tensor, rank: int,
                     share: Tensor) -> Optional[Tensor]:
    """The score :func:`exact_first` sorts the kept tokens by under :data:`EXACT_TIER` (``None``
    for "largest share": the ranking stands)."""
    if EXACT_TIER not in EXACT_TIERS:
        raise ValueError(f"rotatek exact tier {EXACT_TIER!r} is invalid: expected one of {', '.join(EXACT_TIERS)}")
    if EXACT_TIER == "largest share":
        return None
    return share * rotation_error(queries, keys, scale, mask, rank)


def split_error(q: Tensor, keys: Tensor, values: Tensor, logits: Tensor, reference_out: Tensor,
                exact: Tensor, rotated: Tensor, rank: int, queries: Optional[Tensor]) -> float:
    """Relative attention-output error of the queries ``q`` over the span under one split.

    ``q`` ``[B, H, Q, d]`` (scaled), ``keys`` ``[B, H, N, d]``, ``values`` ``[B, H, N, dv]``,
    ``logits`` ``[B, H, Q, N]`` exact (padding at ``-inf``), ``reference_out`` their softmax times
    the Values; ``exact``/``rotated`` ``[B, H, N]`` tier masks. The rotated tier's logits are
    RotateK's, ``q·(RRᵀ(k − μ) + μ)``, with the basis fitted on that tier (query-aware with
    ``queries`` ``[B, Hq, W', d]``); dropped tokens leave the softmax. Returns
    ``Σ‖O − O_ref‖² / Σ‖O_ref‖²``.
    """
    mixed = logits.masked_fill(~exact[:, :, None, :], -math.inf)
    if bool(rotated.any()):
        rotation, mean = reference.span_basis(keys, rank, rotated, queries)  # [B, H, d, r], [B, H, d]
        centred = keys.float() - mean[:, :, None, :]
        approx = (centred @ rotation) @ rotation.transpose(-1, -2) + mean[:, :, None, :]  # [B, H, N, d]
        mixed = torch.where(rotated[:, :, None, :], q @ approx.transpose(-1, -2), mixed)  # [B, H, Q, N]
    out = torch.softmax(mixed, dim=-1).nan_to_num(0.0) @ values.float()  # [B, H, Q, dv]
    return float((out - reference_out).square().sum() / reference_out.square().sum().clamp_min(1e-30))


def choose_split(queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float,
                 layout: Layout, allowed: int, query_aware: bool | str) -> tuple[Optional[Split], Tensor, list[Split]]:
    """The tiered split of one layer's span (see the comment above :data:`ROTATED_FRACTIONS`).

    Parameters
    ----------
    queries : Tensor
        ``[B, Hq, W, d]`` the window's post-RoPE queries.
    keys, values : Tensor
        ``[B, H, N, d]``, ``[B, H, N, dv]``: the span's tokens that are not sinks, left-aligned.
    mask : Tensor
        ``[B, N]`` bool, which of them are real.
    scale : float
    layout : Layout
    allowed : int
        Stored bytes the layer may take (:class:`Layout`).
    query_aware : {"auto", True, False}
        The rotated tier's basis (:class:`rotatek_compile.config.RotateKConfig`): ``"auto"`` judges
        each split with both bases, query-aware and K-only PCA, and keeps the better one
        (``Split.query_aware``); ``True`` the query-aware basis only, ``False`` K-only PCA only.

    Returns
    -------
    chosen : Split or None
        ``None`` when no split fits (the sinks, basis and minimal segments alone exceed the budget).
    order : Tensor
        ``[B, H, N]`` each head's tokens ranked by the whole window's attention share (what the
        cache is built from), best first, padding last; under :data:`EXACT_TIER` "share × rotation
        error" the chosen split's kept tokens re-sorted by :func:`exact_first`.
    splits : list of Split
        Every candidate that fits, with its held-out error.
    """
    candidates = [int(c) for c in mask.sum(dim=1).tolist()]
    splits = candidate_splits(layout, candidates, allowed)
    share = window_share(queries, keys, scale, mask)  # [B, H, N]
    order = ranking(share, mask)
    if not splits:
        return None, order, []
    batch, kv_heads, _, dim = keys.shape
    half = queries.shape[2] // 2
    if JUDGING not in JUDGINGS:
        raise ValueError(f"rotatek judging {JUDGING!r} is invalid: expected one of {', '.join(JUDGINGS)}")
    folds = [(queries[:, :, :half], queries[:, :, half:]), (queries[:, :, half:], queries[:, :, :half])]
    if JUDGING == "later half":
        folds = folds[:1]
    if half == 0:  # a one-query window: judge in-sample
        folds = [(queries, queries)]
    # each split with each basis: K-only PCA, and query-aware RotateK where allowed (which of the two
    # reconstructs the attention better depends on the model: on Gemma 3 K-only PCA was 20x better)
    bases = {"auto": (False, True), True: (True,), False: (False,)}[query_aware]
    splits = [dataclasses.replace(split, query_aware=aware) for split in splits for aware in bases
              if aware or split.rotated_fraction > 0 or len(bases) == 1]  # token-only once
    errors = torch.zeros(len(splits))
    for fit, test in folds:
        fit_share = window_share(fit, keys, scale, mask)
        fit_order = ranking(fit_share, mask)
        fit_score = exact_tier_score(fit, keys, scale, mask, layout.rank, fit_share)
        q = test.float().reshape(batch, kv_heads, -1, dim) * scale  # [B, H, G·W', d]
        logits = (q @ keys.float().transpose(-1, -2)).masked_fill(~mask[:, None, None, :], -math.inf)
        reference_out = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ values.float()  # [B, H, G·W', dv]
        for i, split in enumerate(splits):
            split_order = fit_order if fit_score is None else exact_first(fit_order, fit_score, split.exact, split.rotated)
            exact, rotated = tier_masks(split_order, split.exact, split.rotated)
            errors[i] += split_error(q, keys, values, logits, reference_out, exact & mask[:, None, :],
                                     rotated & mask[:, None, :], layout.rank, fit if split.query_aware else None)
    scored = [dataclasses.replace(split, error=float(e) / len(folds)) for split, e in zip(splits, errors)]
    chosen = pick_split(scored)
    score = exact_tier_score(queries, keys, scale, mask, layout.rank, share)
    if score is not None:
        order = exact_first(order, score, chosen.exact, chosen.rotated)
    return chosen, order, scored


# The tie rules :func:`pick_split` knows (``SPLIT_RULE`` is the one the cache uses).
SPLIT_RULES = ("most rotated", "least rotated", "token-only when tied", "token-only below a floor")
# "token-only below a floor": token-only wherever its own error is at most this (an absolute level:
# among errors that small, which is the smallest is noise), else the most rotated near-tie. Fitted
# on the tuning prompts (benchmarks/split_errors.py; docs/fidelity.md).
TOKEN_ONLY_FLOOR = 0.0231


def pick_split(scored: list[Split], rule: Optional[str] = None) -> Split:
    """Of the splits within ``TIE_TOLERANCE`` of the smallest held-out error, the one that rotates
    the most tokens (``SPLIT_RULE`` "most rotated"), the fewest ("least rotated"), or token-only
    when it is among them and else the one that rotates the most ("token-only when tied"); or
    token-only wherever its error is at most :data:`TOKEN_ONLY_FLOOR`, else the one of the ties that
    rotates the most ("token-only below a floor")."""
    rule = rule or SPLIT_RULE
    if rule not in SPLIT_RULES:
        raise ValueError(f"rotatek tie rule {rule!r} is invalid: expected one of {', '.join(SPLIT_RULES)}")
    if rule == "token-only below a floor":
        token_only = [split for split in scored if split.rotated_fraction == 0 and split.error <= TOKEN_ONLY_FLOOR]
        if token_only:
            return token_only[0]
        rule = "most rotated"
    best = min(split.error for split in scored)
    near = [split for split in scored if split.error <= TIE_TOLERANCE * best]
    if rule == "token-only when tied":
        token_only = [split for split in near if split.rotated_fraction == 0]
        if token_only:
            return token_only[0]
    return (min if rule == "least rotated" else max)(near, key=lambda split: split.rotated_fraction)
