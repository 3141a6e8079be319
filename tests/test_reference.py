"""The plain-PyTorch RotateK math (``kernels/reference.py``) against the method its docstring states.

Invariants are Hypothesis properties over small random shapes (batch, KV heads, GQA ratio 1–4,
head dim, span/full lengths, padding masks); baselines are also checked on constructed examples
whose answer is known by hand. Oracles are independent: ``F.scaled_dot_product_attention`` on the
raw Keys, or an fp64 softmax written out here.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from rotatek_compile.kernels import reference as ref
from tests.host_reads import HostReads

ATOL_FP32 = 1e-5  # r = d must reproduce SDPA to this in fp32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormality_error(rotation: torch.Tensor) -> float:
    rank = rotation.shape[-1]
    return (rotation.transpose(-1, -2) @ rotation - torch.eye(rank)).abs().max().item()


def _projector(rotation: torch.Tensor) -> torch.Tensor:
    r = rotation.double()
    return r @ r.transpose(-1, -2)


def _random_orthogonal(gen: torch.Generator, *batch_dims: int, dim: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(*batch_dims, dim, dim, generator=gen, dtype=torch.float64))
    return q


@st.composite
def decode_cases(draw, max_dim=32):
    """A mixed cache: span Keys with a non-zero mean, padding masks, GQA, a non-empty full segment
    whose every row has at least one real token (so SDPA is defined everywhere)."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 4))
    dim = draw(st.sampled_from([d for d in (4, 8, 16, 32) if d <= max_dim]))
    value_dim = draw(st.sampled_from([4, 8]))
    span_len = draw(st.integers(1, 12))
    full_len = draw(st.integers(1, 6))
    window = draw(st.integers(1, 4))
    keep = draw(st.sampled_from([0.5, 0.8, 1.0]))
    scale = draw(st.sampled_from([1.0 / math.sqrt(dim), 0.5, 0.1]))
    seed = draw(st.integers(0, 2**16))
    gen = _gen(seed)
    q_heads = kv_heads * group
    offset = torch.randn(batch, kv_heads, 1, dim, generator=gen)  # Keys are not centred
    case = dict(
        query=torch.randn(batch, q_heads, dim, generator=gen),
        window=torch.randn(batch, q_heads, window, dim, generator=gen),
        span_keys=torch.randn(batch, kv_heads, span_len, dim, generator=gen) + offset,
        span_values=torch.randn(batch, kv_heads, span_len, value_dim, generator=gen),
        span_mask=torch.rand(batch, span_len, generator=gen) < keep,
        keys=torch.randn(batch, kv_heads, full_len, dim, generator=gen),
        values=torch.randn(batch, kv_heads, full_len, value_dim, generator=gen),
        mask=torch.rand(batch, full_len, generator=gen) < keep,
        scale=scale,
    )
    case["mask"][:, -1] = True  # the current token always sees itself
    return case


def _sdpa_on_raw_keys(case, additive: bool) -> torch.Tensor:
    keys = torch.cat([case["span_keys"], case["keys"]], dim=2)  # [B, H, Sv + Sf, d]
    values = torch.cat([case["span_values"], case["values"]], dim=2)
    valid = torch.cat([case["span_mask"], case["mask"]], dim=-1)[:, None, None, :]  # [B, 1, 1, S]
    if additive:
        attn_mask = torch.zeros(valid.shape).masked_fill(~valid, -math.inf)
    else:
        attn_mask = valid
    out = F.scaled_dot_product_attention(case["query"][:, :, None], keys, values, attn_mask=attn_mask,
                                         scale=case["scale"], enable_gqa=True)
    return out[:, :, 0]  # [B, Hq, dv]


def _decode_oracle_fp64(query, span_logit_fn, span_values, span_mask, keys, values, mask, scale):
    """fp64 masked softmax over [span | full] with span logits given by ``span_logit_fn(q)``."""
    batch, q_heads, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.double().view(batch, kv_heads, q_heads // kv_heads, dim)  # [B, H, G, d]
    logits = torch.cat([span_logit_fn(q), q @ keys.double().transpose(-1, -2)], dim=-1) * scale
    valid = torch.cat([span_mask, mask], dim=-1)[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~valid, -math.inf), dim=-1)
    out = probs @ torch.cat([span_values, values], dim=2).double()
    return out.reshape(batch, q_heads, -1)


# --- the basis R ---------------------------------------------------------------------------------


@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 3), dim=st.sampled_from([4, 8, 16, 32]),
    rank_frac=st.sampled_from([0.125, 0.25, 0.5, 1.0]), span_len=st.integers(1, 40),
    query_aware=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2**16),
)
def test_eigh_basis_has_orthonormal_columns(batch, kv_heads, dim, rank_frac, span_len, query_aware, padded,
                                            seed):
    # Any span, rank-deficient ones (span_len ≤ r) and all-padding rows included.
    gen = _gen(seed)
    rank = max(1, int(dim * rank_frac))
    keys = torch.randn(batch, kv_heads, span_len, dim, generator=gen) * torch.logspace(0, -2, dim) + 3.0
    mask = torch.rand(batch, span_len, generator=gen) < 0.6 if padded else None
    queries = torch.randn(batch, 2 * kv_heads, 4, dim, generator=gen) if query_aware else None
    rotation, mean = ref.span_basis(keys, rank, mask, queries, solver="eigh")
    assert rotation.shape == (batch, kv_heads, dim, rank) and rotation.dtype == torch.float32
    assert mean.shape == (batch, kv_heads, dim) and mean.dtype == torch.float32
    assert _orthonormality_error(rotation) < 1e-5


@given(
    kv_heads=st.integers(1, 3), dim=st.sampled_from([4, 8, 16, 32]),
    rank_frac=st.sampled_from([0.125, 0.25, 0.5, 1.0]), extra=st.integers(0, 16),
    query_aware=st.booleans(), seed=st.integers(0, 2**16),
)
def test_subspace_basis_has_orthonormal_columns(kv_heads, dim, rank_frac, extra, query_aware, seed):
    # Well-conditioned spans (≥ 4d i.i.d. tokens); short and rank-deficient ones are tested below.
    gen = _gen(seed)
    rank = max(1, int(dim * rank_frac))
    keys = torch.randn(2, kv_heads, 4 * dim + extra, dim, generator=gen) + 1.0
    queries = torch.randn(2, kv_heads, 8, dim, generator=gen).abs() + 0.5 if query_aware else None
    rotation, _ = ref.span_basis(keys, rank, queries=queries, solver="subspace")
    assert rotation.shape == (2, kv_heads, dim, rank)
    assert _orthonormality_error(rotation) < 1e-4


def test_subspace_basis_orthonormal_on_rank_deficient_span():
    keys = torch.randn(1, 1, 4, 8, generator=_gen(0))  # 4 tokens → rank(C) = 3 < r = 4
    rotation, _ = ref.span_basis(keys, 4, solver="subspace")
    assert _orthonormality_error(rotation) < 1e-3


def test_subspace_head_without_span_tokens_keeps_its_start_axes(caplog):
    """A head without span tokens (C = 0: nothing to factorise) next to an ordinary one: it iterates
    the identity and keeps the coordinate axes, without a breakdown; the other head's basis is the
    one it gets alone."""
    keys = torch.randn(1, 2, 64, 8, generator=_gen(1))
    mask = torch.ones(1, 2, 64, dtype=torch.bool)
    mask[0, 0] = False
    with caplog.at_level(logging.DEBUG, logger="rotatek_compile"):
        rotation, _ = ref.span_basis(keys, 4, key_mask=mask, solver="subspace")
    assert "broke down" not in caplog.text
    assert _orthonormality_error(rotation) < 1e-3
    assert torch.equal(rotation[0, 0].abs().sum(dim=0), torch.ones(4))  # one axis per column
    alone, _ = ref.span_basis(keys[:, 1:], 4, solver="subspace")
    torch.testing.assert_close(rotation[:, 1:], alone)


def test_subspace_breakdown_keeps_the_start_axes_without_a_host_read(caplog):
    """A non-finite covariance cannot be factorised: that basis is its start axes (orthonormal),
    chosen on the device, and the other bases of the batch are unaffected."""
    gen = _gen(2)
    x = torch.randn(2, 64, 8, generator=gen)
    cov = x.transpose(-1, -2) @ x / 64
    broken = cov.clone()
    broken[0, 3, 3] = float("nan")
    with HostReads() as host, caplog.at_level(logging.DEBUG, logger="rotatek_compile"):
        rotation = ref.subspace_iteration(broken, 3)
    assert host.reads == ["__bool__", "__int__"]  # the debug log's, only with DEBUG on
    assert "broke down for 1 of 2 bases" in caplog.text
    with HostReads() as host:
        assert torch.equal(ref.subspace_iteration(broken, 3), rotation)
    assert host.reads == []
    assert torch.isfinite(rotation).all() and _orthonormality_error(rotation) < 1e-4
    assert torch.equal(rotation[0].abs().sum(dim=0), torch.ones(3))
    torch.testing.assert_close(rotation[1], ref.subspace_iteration(cov[1:], 3)[0])


@pytest.mark.parametrize("spread", [1e2, 1e5, 1e8])
def test_subspace_iteration_needs_no_fallback_on_spread_or_deficient_spectra(spread, caplog):
    """Spectra spread over many orders of magnitude, and of rank below r (a fifth of a 32-layer
    model's bases broke plain CholeskyQR): shifted CholeskyQR3 on C + δI factorises them all and
    the basis keeps the top-r variance."""
    gen = _gen(int(spread))
    dim, rank = 32, 8
    vectors = torch.linalg.qr(torch.randn(2, dim, dim, generator=gen, dtype=torch.float64)).Q
    values = torch.logspace(0, -math.log10(spread), dim, dtype=torch.float64).expand(2, dim).clone()
    values[1, rank // 2:] = 0.0  # rank r/2
    cov = ((vectors * values[:, None, :]) @ vectors.transpose(-1, -2)).float()
    with caplog.at_level(logging.DEBUG, logger="rotatek_compile"):
        rotation = ref.subspace_iteration(cov, rank)
    assert "broke down" not in caplog.text
    assert _orthonormality_error(rotation) < 1e-4
    kept = (rotation.transpose(-1, -2) @ cov @ rotation).diagonal(dim1=-2, dim2=-1).sum(-1)  # [2]
    best = values[:, :rank].sum(-1).float()
    assert (kept >= 0.97 * best).all(), (kept, best)


def test_subspace_basis_does_not_raise_on_short_span_at_full_rank():
    gen = _gen(0)
    keys = torch.randn(1, 1, 2, 32, generator=gen)
    rotation, _ = ref.span_basis(keys, 32, queries=torch.randn(1, 1, 32, 32, generator=gen), solver="subspace")
    assert _orthonormality_error(rotation) < 1e-4


@given(
    dim=st.sampled_from([8, 16, 32]), rank=st.integers(1, 6), batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_subspace_iteration_matches_eigh_on_separated_spectrum(dim, rank, batch, seed):
    # C = U diag(λ) Uᵀ with λ = 100, 50, 25, … for the top r, then ≤ 1e-2: (λ_{r+1}/λ_r)^5 is negligible.
    gen = _gen(seed)
    rank = min(rank, dim // 2)
    top = 100.0 * 2.0 ** -torch.arange(rank, dtype=torch.float64)
    tail = 1e-2 * torch.rand(dim - rank, generator=gen, dtype=torch.float64)
    basis = _random_orthogonal(gen, batch, dim=dim)
    cov = (basis * torch.cat([top, tail])) @ basis.transpose(-1, -2)
    cov = ((cov + cov.transpose(-1, -2)) / 2).float()
    exact = ref.top_eigenvectors(cov, rank)
    iterated = ref.subspace_iteration(cov, rank)
    assert (_projector(exact) - _projector(iterated)).abs().max().item() < 1e-4
    # And both are the planted eigenvectors.
    planted = basis[..., :rank]
    assert (_projector(planted) - _projector(exact)).abs().max().item() < 1e-4


def test_top_eigenvectors_descending_order():
    cov = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.5]))
    rotation = ref.top_eigenvectors(cov, 3)
    assert torch.equal(rotation.abs().argmax(dim=0), torch.tensor([1, 2, 0]))


# --- query-aware weighting ---------------------------------------------------------------------


def _separated_keys(gen, batch, kv_heads, span_len, dim):
    """Keys whose covariance has eigenvalues ≈ 9^-i along random directions (large gaps)."""
    basis = _random_orthogonal(gen, batch, kv_heads, dim=dim).float()
    spread = 3.0 ** -torch.arange(dim, dtype=torch.float32)
    return (torch.randn(batch, kv_heads, span_len, dim, generator=gen) * spread) @ basis.transpose(-1, -2)


@given(
    kv_heads=st.integers(1, 2), group=st.integers(1, 4), dim=st.sampled_from([4, 8, 16]),
    rank=st.integers(1, 4), window=st.integers(1, 8), seed=st.integers(0, 2**16),
)
def test_query_aware_equals_k_only_when_query_norms_are_equal(kv_heads, group, dim, rank, window, seed):
    # q̄_c constant over c ⇒ C ⊙ q̄q̄ᵀ = const·C, and the ridge shifts every eigenvalue equally.
    gen = _gen(seed)
    rank = min(rank, dim - 1)
    keys = _separated_keys(gen, 2, kv_heads, 8 * dim, dim)
    signs = torch.randint(0, 2, (2, kv_heads * group, window, dim), generator=gen).float() * 2 - 1
    per_head = torch.rand(2, kv_heads * group, 1, 1, generator=gen) + 0.1  # differs across heads
    queries = signs * per_head  # every column of a head has the same norm
    weighted, _ = ref.span_basis(keys, rank, queries=queries)
    plain, _ = ref.span_basis(keys, rank, queries=None)
    assert (_projector(weighted) - _projector(plain)).abs().max().item() < 1e-4


def test_query_aware_weighting_changes_the_basis():
    # Axis-aligned Keys: channel 0 has variance 4, channel 1 variance 1, the rest ~1e-4.
    gen = _gen(0)
    scale = torch.tensor([2.0, 1.0] + [1e-2] * 6)
    keys = torch.randn(1, 1, 256, 8, generator=gen) * scale
    queries = torch.full((1, 1, 4, 8), 0.1)
    queries[..., 1] = 10.0  # the queries only look at channel 1
    plain, _ = ref.span_basis(keys, 1, queries=None)
    weighted, _ = ref.span_basis(keys, 1, queries=queries)
    assert plain[0, 0, :, 0].abs().argmax().item() == 0
    assert weighted[0, 0, :, 0].abs().argmax().item() == 1
    assert (_projector(plain) - _projector(weighted)).abs().max().item() > 0.5


def test_query_channel_norms_group_mean_and_floor():
    queries = torch.zeros(1, 2, 3, 4)
    queries[0, 0, :, 0] = 1.0  # ‖·‖ = √3 in head 0, channel 0
    queries[0, 1, :, 0] = 2.0  # 2√3 in head 1
    queries[0, :, :, 1:3] = 1.0  # √3 in channels 1, 2 of both heads; channel 3 is all zero
    norms = ref.query_channel_norms(queries, num_kv_heads=1)  # [1, 1, 4]
    root3 = math.sqrt(3)
    median = torch.tensor([1.5 * root3, root3, root3, 0.0]).median()  # torch's lower median
    expected = torch.tensor([1.5 * root3, root3, root3, ref.QUERY_NORM_FLOOR * median])
    torch.testing.assert_close(norms[0, 0], expected)
    with pytest.raises(ValueError, match="multiple"):
        ref.query_channel_norms(torch.zeros(1, 3, 2, 4), num_kv_heads=2)


def test_span_covariance_ignores_padding():
    gen = _gen(1)
    keys = torch.randn(1, 2, 10, 4, generator=gen)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    padded = keys.clone()
    padded[:, :, 6:] = 1e6  # garbage in padding must not matter
    cov, mean = ref.span_covariance(padded, mask)
    real = keys[:, :, :6].double()
    centred = real - real.mean(2, keepdim=True)
    torch.testing.assert_close(mean, real.mean(2).float())
    torch.testing.assert_close(cov, (centred.transpose(-1, -2) @ centred).float(), atol=1e-5, rtol=1e-5)


# --- compression and decode --------------------------------------------------------------------


@given(case=decode_cases(), query_aware=st.booleans(), additive=st.booleans())
def test_full_rank_decode_equals_sdpa_on_raw_keys(case, query_aware, additive):
    dim = case["query"].shape[-1]
    span = ref.rotatek_compress(case["span_keys"], dim, case["span_mask"],
                                case["window"] if query_aware else None, solver="eigh")
    assert span.mean_residual.abs().max().item() < 1e-5  # δμ = 0 at r = d
    out = ref.decode_attention(case["query"], span.keys, span.rotation, span.mean_residual,
                               case["span_values"], case["span_mask"], case["keys"], case["values"],
                               case["mask"], case["scale"])
    expected = _sdpa_on_raw_keys(case, additive)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert (out - expected).abs().max().item() <= ATOL_FP32


@given(case=decode_cases(), rank_frac=st.sampled_from([0.25, 0.5, 0.75]), query_aware=st.booleans())
def test_logit_error_is_perpendicular_term_minus_mean_correction(case, rank_frac, query_aware):
    # exact − compressed = q·k − ((qR)·K̃ + q·δμ) = q_⊥·k_⊥ − q·δμ,  ⊥ = I − RRᵀ.
    keys = case["span_keys"]
    batch, kv_heads, _, dim = keys.shape
    rank = max(1, int(dim * rank_frac))
    span = ref.rotatek_compress(keys, rank, case["span_mask"], case["window"] if query_aware else None)
    q = case["query"].double().view(batch, kv_heads, -1, dim)  # [B, H, G, d]
    k = keys.double()  # [B, H, S, d]
    rot, dmu = span.rotation.double(), span.mean_residual.double()[:, :, None, :]  # [B,H,d,r], [B,H,1,d]
    exact = q @ k.transpose(-1, -2)  # [B, H, G, S]
    compressed = (q @ rot) @ span.keys.double().transpose(-1, -2) + (q * dmu).sum(-1, keepdim=True)
    perp = torch.eye(dim, dtype=torch.float64) - rot @ rot.transpose(-1, -2)  # [B, H, d, d]
    predicted = (q @ perp) @ (k @ perp).transpose(-1, -2) - (q * dmu).sum(-1, keepdim=True)
    size = q.norm(dim=-1)[..., None] * k.norm(dim=-1)[:, :, None, :]  # |q||k|, [B, H, G, S]
    assert ((exact - compressed) - predicted).abs().le(1e-5 * (1 + size)).all()
    # δμ is the part of the (masked) mean outside span(R).
    _, mean = ref.span_covariance(keys, case["span_mask"])
    torch.testing.assert_close(dmu[:, :, 0], (mean.double()[:, :, None] @ perp)[:, :, 0], atol=1e-5, rtol=0)


@given(case=decode_cases(), rank_frac=st.sampled_from([0.25, 0.5]))
def test_pruned_decode_is_softmax_of_compressed_logits(case, rank_frac):
    dim = case["query"].shape[-1]
    rank = max(1, int(dim * rank_frac))
    span = ref.rotatek_compress(case["span_keys"], rank, case["span_mask"], case["window"])
    out = ref.decode_attention(case["query"], *span, case["span_values"], case["span_mask"], case["keys"],
                               case["values"], case["mask"], case["scale"])

    def span_logits(q):
        rot, dmu = span.rotation.double(), span.mean_residual.double()[:, :, None, :]
        return (q @ rot) @ span.keys.double().transpose(-1, -2) + (q * dmu).sum(-1, keepdim=True)

    expected = _decode_oracle_fp64(case["query"], span_logits, case["span_values"], case["span_mask"],
                                   case["keys"], case["values"], case["mask"], case["scale"])
    assert (out.double() - expected).abs().max().item() <= ATOL_FP32


def test_compressed_span_is_stored_in_the_cache_dtype():
    # K̃, R and δμ all in the Keys' dtype (the official code keeps R there too): true bytes
    keys = torch.randn(1, 2, 16, 8, generator=_gen(3)).to(torch.bfloat16)
    span = ref.rotatek_compress(keys, 2)
    assert span.keys.shape == (1, 2, 16, 2) and span.rotation.shape == (1, 2, 8, 2)
    assert {t.dtype for t in span} == {torch.bfloat16}


@pytest.mark.parametrize("dim", [64, 128])
def test_full_rank_bf16_logits_are_within_bf16_rounding(dim):
    # R̂ rounded to bf16 is orthogonal only to ~2⁻⁸; K̃ and δμ are computed from R̂ itself, so the
    # logit error at r = d stays at the scale of one bf16 rounding of the logit (2⁻⁸ ≈ 3.9e-3)
    gen = _gen(dim)
    keys = (torch.randn(1, 2, 256, dim, generator=gen) + torch.randn(1, 2, 1, dim, generator=gen)).to(torch.bfloat16)
    queries = torch.randn(1, 2, 8, dim, generator=gen, dtype=torch.float64)
    span = ref.rotatek_compress(keys, dim)
    rotation, pruned, residual = span.rotation.double(), span.keys.double(), span.mean_residual.double()
    logits = (queries @ rotation) @ pruned.transpose(-1, -2) + (queries * residual[:, :, None]).sum(-1, keepdim=True)
    exact = queries @ keys.double().transpose(-1, -2)
    assert (logits - exact).abs().max() / exact.abs().max() < 2 ** -7


def test_decode_gives_zeros_for_fully_masked_rows():
    gen = _gen(5)
    batch, kv_heads, group, dim, rank, value_dim = 3, 2, 2, 8, 4, 6
    span = ref.rotatek_compress(torch.randn(batch, kv_heads, 5, dim, generator=gen), rank)
    args = dict(
        query=torch.randn(batch, kv_heads * group, dim, generator=gen),
        span_values=torch.randn(batch, kv_heads, 5, value_dim, generator=gen),
        span_mask=torch.ones(batch, 5, dtype=torch.bool),
        keys=torch.randn(batch, kv_heads, 3, dim, generator=gen),
        values=torch.randn(batch, kv_heads, 3, value_dim, generator=gen),
        mask=torch.ones(batch, 3, dtype=torch.bool),
    )
    args["span_mask"][1] = False
    args["mask"][1] = False

    def run(rows):
        return ref.decode_attention(
            args["query"][rows], span.keys[rows], span.rotation[rows], span.mean_residual[rows],
            args["span_values"][rows], args["span_mask"][rows], args["keys"][rows], args["values"][rows],
            args["mask"][rows], 0.3)

    out = run(slice(None))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(kv_heads * group, value_dim))
    torch.testing.assert_close(out[[0, 2]], run([0, 2]))  # other rows unaffected


# --- baselines ---------------------------------------------------------------------------------


def test_think_picks_largest_query_times_key_energy():
    # mean(K_c²) = a_c², mean(Q_c²) = b_c²: products [4, 9, 1, 16, 0.25, 2.25] → top-3 = {3, 1, 0},
    # while the Keys alone would pick {4, 3, 1} and the queries alone {5, 2, 0}.
    a2 = torch.tensor([1.0, 9.0, 0.04, 16.0, 25.0, 0.0225])
    b2 = torch.tensor([4.0, 1.0, 25.0, 1.0, 0.01, 100.0])
    gen = _gen(0)
    signs_k = torch.randint(0, 2, (1, 1, 6, 6), generator=gen).float() * 2 - 1
    keys = signs_k * a2.sqrt()  # [1, 1, S=6, d=6]
    keys = torch.cat([keys, torch.full((1, 1, 2, 6), 1e3)], dim=2)  # two padding tokens
    mask = torch.tensor([[True] * 6 + [False] * 2])
    signs_q = torch.randint(0, 2, (1, 2, 3, 6), generator=gen).float() * 2 - 1
    queries = signs_q * (2 * b2).sqrt()
    queries[:, 1] = 0.0  # group mean of (2b², 0) = b²
    channels = ref.think_channels(keys, queries, 3, key_mask=mask)
    assert channels.tolist() == [[[0, 1, 3]]]
    assert ref.think_channels(keys[:, :, :6], queries, 1).tolist() == [[[3]]]


@given(case=decode_cases(), rank_frac=st.sampled_from([0.25, 0.5, 1.0]))
def test_selection_matrix_decode_reproduces_gathered_channel_logits(case, rank_frac):
    keys = case["span_keys"]
    batch, kv_heads, _, dim = keys.shape
    rank = max(1, int(dim * rank_frac))
    channels = ref.think_channels(keys, case["window"], rank, case["span_mask"])  # [B, H, r]
    assert channels.shape == (batch, kv_heads, rank)
    assert (channels.diff(dim=-1) > 0).all()  # ascending, distinct
    select = ref.selection_matrix(channels, dim)  # [B, H, d, r]
    gathered = keys.gather(-1, channels[:, :, None, :].expand(-1, -1, keys.shape[2], -1))
    assert torch.equal(keys @ select, gathered)
    zeros = torch.zeros(batch, kv_heads, dim)
    out = ref.decode_attention(case["query"], gathered, select, zeros, case["span_values"], case["span_mask"],
                               case["keys"], case["values"], case["mask"], case["scale"])

    def span_logits(q):  # q[c]·k[c] over the kept channels c only
        idx = channels[:, :, None, :]
        q_kept = q.gather(-1, idx.expand(-1, -1, q.shape[2], -1))
        return q_kept @ gathered.double().transpose(-1, -2)

    expected = _decode_oracle_fp64(case["query"], span_logits, case["span_values"], case["span_mask"],
                                   case["keys"], case["values"], case["mask"], case["scale"])
    assert (out.double() - expected).abs().max().item() <= ATOL_FP32


@given(
    kv_heads=st.integers(1, 2), group=st.integers(1, 3), dim=st.sampled_from([4, 8, 16]),
    rank_frac=st.sampled_from([0.25, 0.5, 0.75, 1.0]), span_len=st.integers(1, 10),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_spark_keeps_top_channels_and_fills_with_pruned_mean(kv_heads, group, dim, rank_frac, span_len, dtype,
                                                             seed):
    gen = _gen(seed)
    rank = max(1, int(dim * rank_frac))
    keys = torch.randn(2, kv_heads, span_len, dim, generator=gen).to(dtype)
    queries = torch.randn(2, kv_heads * group, 3, dim, generator=gen)
    sparse = ref.spark_select(keys, queries, rank)
    assert sparse.values.shape == sparse.channels.shape == (2, kv_heads, span_len, rank)
    assert sparse.channels.dtype == torch.int16 and sparse.values.dtype == dtype
    assert sparse.fill.shape == (2, kv_heads, span_len) and sparse.fill.dtype == dtype
    channels = sparse.channels.long()
    assert (channels.diff(dim=-1) > 0).all()
    assert torch.equal(sparse.values, keys.gather(-1, channels))
    # Score |q̄_c|·K_c², q̄ = mean of |Q| over the window and the KV head's query group.
    q_mag = queries.abs().mean(2).view(2, kv_heads, group, dim).mean(2)  # [B, H, d]
    score = q_mag[:, :, None, :] * keys.float().square()  # [B, H, S, d]
    kept = torch.zeros_like(score, dtype=torch.bool).scatter(-1, channels, True)
    if rank < dim:
        assert (score.masked_fill(~kept, math.inf).amin(-1) >= score.masked_fill(kept, -math.inf).amax(-1)).all()
    full = ref.spark_reconstruct(sparse, dim)
    assert full.shape == keys.shape and full.dtype == dtype
    assert torch.equal(full.gather(-1, channels), sparse.values)
    if rank == dim:
        assert torch.equal(full, keys)  # r = d: exact
    else:
        pruned_mean = keys.float().masked_fill(kept, 0).sum(-1) / (dim - rank)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(sparse.fill.float(), pruned_mean, atol=tol, rtol=tol)
        fill = full.float().masked_fill(kept, math.nan)
        expect = sparse.fill.float()[..., None].expand_as(fill).masked_fill(kept, math.nan)
        torch.testing.assert_close(fill, expect, equal_nan=True)


@given(
    kv_heads=st.integers(1, 2), group=st.integers(1, 3), span_len=st.integers(1, 12), window=st.integers(1, 4),
    padded=st.booleans(), seed=st.integers(0, 2**16),
)
def test_token_scores_are_window_attention_mass(kv_heads, group, span_len, window, padded, seed):
    gen = _gen(seed)
    dim, batch = 8, 2
    keys = torch.randn(batch, kv_heads, span_len, dim, generator=gen)
    queries = torch.randn(batch, kv_heads * group, window, dim, generator=gen)
    mask = torch.rand(batch, span_len, generator=gen) < 0.6 if padded else None
    scores = ref.token_scores(queries, keys, 0.35, mask)  # [B, H, S]
    assert scores.shape == (batch, kv_heads, span_len) and scores.dtype == torch.float32
    q = queries.double().view(batch, kv_heads, group, window, dim)
    logits = q @ keys.double()[:, :, None].transpose(-1, -2) * 0.35  # [B, H, G, W, S]
    valid = torch.ones(batch, span_len, dtype=torch.bool) if mask is None else mask
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None, None], -math.inf), -1).nan_to_num(0.0)
    torch.testing.assert_close(scores.double(), probs.sum((2, 3)), atol=1e-5, rtol=1e-5)
    assert (scores[~valid[:, None].expand_as(scores)] == 0).all()  # padding gets no mass


@given(
    heads=st.integers(1, 3), span_len=st.integers(1, 16), keep=st.sampled_from([0.125, 0.25, 0.5, 0.75, 1.0]),
    padded=st.booleans(), seed=st.integers(0, 2**16),
)
def test_keep_tokens_keeps_the_best_real_tokens(heads, span_len, keep, padded, seed):
    gen = _gen(seed)
    batch = 3
    scores = torch.rand(batch, heads, span_len, generator=gen)  # distinct with probability 1
    mask = torch.rand(batch, span_len, generator=gen) < 0.6 if padded else None
    indices, kept_mask = ref.keep_tokens(scores, keep, mask)
    valid = torch.ones(batch, span_len, dtype=torch.bool) if mask is None else mask
    counts = [math.ceil(keep * int(n)) for n in valid.sum(-1)]  # keep is dyadic: no rounding doubt
    assert kept_mask.shape == (batch, max(counts)) and indices.shape == (batch, heads, max(counts))
    for b in range(batch):
        assert kept_mask[b].tolist() == [i < counts[b] for i in range(max(counts))]
        for h in range(heads):
            picked = indices[b, h, : counts[b]].tolist()
            assert picked == sorted(set(picked))  # ascending positions, no repeats
            assert all(valid[b, i] for i in picked)  # real tokens only
            real = valid[b].nonzero()[:, 0].tolist()
            best = sorted(real, key=lambda i: -scores[b, h, i].item())[: counts[b]]
            assert sorted(best) == picked
            assert (indices[b, h] < span_len).all() and (indices[b, h] >= 0).all()  # surplus stays gatherable
    gathered = ref.gather_tokens(torch.arange(span_len).float().expand(batch, heads, span_len)[..., None], indices)
    assert torch.equal(gathered[..., 0].long(), indices)


@pytest.mark.parametrize("length", [7, ref.GRAM_CHUNK, 2 * ref.GRAM_CHUNK + 1, 5 * ref.GRAM_CHUNK + 300])
def test_chunked_gram_equals_the_plain_product(length):
    """The covariance's ``xᵀx`` summed over token chunks (a long span's product spread over the GPU)."""
    x = torch.randn(2, 3, length, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    torch.testing.assert_close(ref._gram(x), x.transpose(-1, -2) @ x)


@pytest.mark.parametrize("length", [7, 2 * ref.GRAM_CHUNK + 1, 3 * ref.GRAM_CHUNK])
def test_chunked_long_product_equals_the_plain_product(length):
    """``[..., M, S] @ [..., S, N]`` summed over token chunks, leading dims broadcast (as a shared
    mask row against every head's Keys)."""
    gen = torch.Generator().manual_seed(length)
    a = torch.randn(2, 1, 3, 5, length, dtype=torch.float64, generator=gen)
    b = torch.randn(3, length, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(ref._long_product(a, b), a @ b)
