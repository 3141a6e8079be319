"""``kv_budget``: the tiered span (exact / rotated / dropped) under one byte budget.

Synthetic layers (``compress_layer`` on random or constructed Keys) for the split rule and the byte
budget; a tiny Llama for the option end to end. Tokens are told apart by their Values.
"""

from __future__ import annotations

import math

import pytest
import torch

import rotatek_compile
from rotatek_compile import RotateKConfig, tiers
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.kernels import reference
from rotatek_compile.state import CompressedLayer, KeptExact, attached, compress_layer
from tests.test_generate import generate, tiny_llama

DIM, WINDOW, KV_HEADS, GROUP = 16, 8, 2, 2


def layer_inputs(padding=(0,), length=300, seed=0, key_rank=None):
    """Keys ``[B, H, S, d]`` (of rank ``key_rank`` per head if given), Values, window queries,
    the text span (each row's prompt minus its last ``W`` tokens) and the real tokens."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(padding)
    keys = torch.randn(batch, KV_HEADS, length, DIM, generator=gen)
    if key_rank is not None:
        basis = torch.randn(batch, KV_HEADS, key_rank, DIM, generator=gen)
        keys = 2 * torch.randn(batch, KV_HEADS, length, key_rank, generator=gen) @ basis
    values = torch.randn(batch, KV_HEADS, length, DIM, generator=gen)
    queries = torch.randn(batch, KV_HEADS * GROUP, WINDOW, DIM, generator=gen)
    valid = torch.arange(length)[None, :] >= torch.tensor(padding)[:, None]
    span = valid & (valid.flip(-1).cumsum(-1).flip(-1) > WINDOW)
    return keys, values, queries, span, valid


def compress(inputs, **options) -> CompressedLayer | KeptExact:
    keys, values, queries, span, valid = inputs
    config = RotateKConfig(query_window=WINDOW, span="prompt", **options)
    return compress_layer(keys, values, queries, span, valid, config, scale=DIM ** -0.5)


def token_ids(values, row, head, tensor, mask):
    """Positions (in the prompt) of the real tokens a segment holds for ``row``/``head``."""
    return {int((values[row, head] == v).all(-1).nonzero()) for v in tensor[row, head][mask[row]]}


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "half", True, float("nan")])
def test_kv_budget_is_validated(bad):
    with pytest.raises(ValueError, match=r"^rotatek option kv_budget=.* is invalid: expected a float in \(0, 1\]"):
        RotateKConfig(kv_budget=bad)


def test_kv_budget_needs_rotatek_and_every_token():
    with pytest.raises(ValueError, match="kv_budget=0.5 is invalid: expected method='rotatek'"):
        RotateKConfig(kv_budget=0.5, method="think")
    with pytest.raises(ValueError, match="kv_budget=0.5 is invalid: expected token_keep=1"):
        RotateKConfig(kv_budget=0.5, token_keep=0.5)
    assert RotateKConfig(kv_budget=0.5).channels_for(64) == 32  # the rotated tier's default r = d/2
    assert RotateKConfig(kv_budget=0.5, key_channels=8).channels_for(64) == 8


@pytest.mark.parametrize("budget", [0.2, 0.25, 0.4, 0.5, 0.63, 0.9])
@pytest.mark.parametrize("padding", [(0,), (0, 17), (40, 0, 3)])
def test_true_bytes_stay_within_the_budget(budget, padding):
    # every stored tensor (Keys, basis, Values, masks, padding slots) counted, in batches of rows
    # with different span lengths
    inputs = layer_inputs(padding, seed=len(padding))
    layer = compress(inputs, kv_budget=budget)
    assert isinstance(layer, CompressedLayer)
    keys, values, _, span, valid = inputs
    token_bytes = KV_HEADS * 2 * DIM * 4
    outside = int((valid & ~span).sum()) * token_bytes
    assert layer.stored_bytes <= outside + budget * int(span.sum()) * token_bytes
    assert layer.split.stored_bytes == layer.stored_bytes - outside
    assert layer.split.byte_ratio <= budget
    assert layer.split.byte_ratio > budget - 0.05  # and the budget is used
    assert layer.split.span == int(span.sum())
    assert layer.split.exact + layer.split.compressed + layer.split.dropped == layer.split.span


def test_tiers_follow_each_heads_window_attention():
    # per row and head: the exact tier (rest segment) and the rotated tier (span segment) are
    # disjoint, as large in every head, and rank above the dropped tokens by window share
    inputs = layer_inputs((0, 11), seed=3)
    keys, values, queries, span, valid = inputs
    layer = compress(inputs, kv_budget=0.4)
    split = layer.split
    assert split.exact > 2 and split.compressed > 0 and split.dropped > 0  # all three tiers in use
    sinks = tiers.attention_sinks(queries, keys, DIM ** -0.5, span, valid)
    share = tiers.window_share(queries, keys, DIM ** -0.5, span & ~sinks)  # [B, H, S], the ranking's
    for row in range(2):
        outside = set((valid[row] & ~span[row]).nonzero()[:, 0].tolist())
        counts = set()
        for head in range(KV_HEADS):
            exact = token_ids(values, row, head, layer.values, layer.mask) - outside
            rotated = token_ids(values, row, head, layer.span_values, layer.span_mask)
            real = set(span[row].nonzero()[:, 0].tolist())
            dropped = real - exact - rotated
            assert not exact & rotated and exact | rotated <= real
            assert set(sinks[row].nonzero()[:, 0].tolist()) <= exact
            ranked = exact - set(sinks[row].nonzero()[:, 0].tolist())
            low = lambda tokens: min(share[row, head, list(tokens)].tolist())  # noqa: E731
            high = lambda tokens: max(share[row, head, list(tokens)].tolist())  # noqa: E731
            assert low(ranked) >= high(rotated) and low(rotated) >= high(dropped)
            counts.add((len(exact), len(rotated)))
        assert len(counts) == 1  # every head keeps as many of each kind


def test_token_only_is_chosen_where_rotation_cannot_help():
    # 100 "hot" span tokens with isotropic Keys (each query attends to them its own way: a rotated
    # Key, r = d/2, loses half of that), the other 192 pushed far from every query (no attention):
    # token-only keeps every hot token exact and drops only unattended ones; any split with a
    # rotated tier has fewer exact slots and must rotate hot tokens
    keys, values, queries, span, valid = inputs = layer_inputs(seed=5)
    gen = torch.Generator().manual_seed(6)
    shared = torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0)  # e: in every query
    queries += 3 * shared
    hot = torch.zeros(300, dtype=torch.bool)
    hot[torch.randperm(291, generator=gen)[:100] + 1] = True  # not the first token (a sink)
    isotropic = 2 * torch.randn(1, KV_HEADS, 300, DIM, generator=gen)
    isotropic -= (isotropic @ shared)[..., None] * shared  # ⊥ e
    keys[:] = torch.where(hot[:, None], isotropic, -12 * shared)
    layer = compress(inputs, kv_budget=0.4)
    assert layer.split.compressed == 0 and layer.split.exact >= 100 and layer.split.dropped > 0


@pytest.mark.parametrize("rule, tied, not_tied", [("most rotated", 0.5, 0.5), ("least rotated", 0.0, 0.25),
                                                   ("token-only when tied", 0.0, 0.5),
                                                   ("token-only below a floor", 0.5, 0.5)])
def test_near_ties_go_by_the_split_rule(rule, tied, not_tied):
    """Splits within TIE_TOLERANCE of the smallest error are ties; the rule takes the one that
    rotates the most or the fewest tokens of them, or token-only if it is tied and else the most
    rotated; never one outside the tie."""
    def split(fraction: float, error: float) -> tiers.Split:
        return tiers.Split(rotated_fraction=fraction, exact=(1,), rotated=(1,), stored_bytes=1, error=error)

    outside = split(0.75, 1.0 * tiers.TIE_TOLERANCE + 0.01)
    scored = [split(0.0, 1.1), split(0.25, 1.0), split(0.5, 1.2), outside]
    assert tiers.pick_split(scored, rule).rotated_fraction == tied
    scored[0] = split(0.0, 2.0)  # token-only outside the tie
    assert tiers.pick_split(scored, rule).rotated_fraction == not_tied


def test_token_only_is_taken_below_the_floor_whatever_the_others(monkeypatch):
    """"token-only below a floor": token-only wherever its error is at most TOKEN_ONLY_FLOOR, even
    when a split with a rotated tier scores far lower; above it, the most rotated near-tie."""
    def split(fraction: float, error: float) -> tiers.Split:
        return tiers.Split(rotated_fraction=fraction, exact=(1,), rotated=(1,), stored_bytes=1, error=error)

    monkeypatch.setattr(tiers, "TOKEN_ONLY_FLOOR", 1e-3)
    scored = [split(0.0, 1e-3), split(0.5, 1e-5), split(0.75, 1.1e-5)]
    assert tiers.pick_split(scored, "token-only below a floor").rotated_fraction == 0.0
    scored[0] = split(0.0, 2e-3)
    assert tiers.pick_split(scored, "token-only below a floor").rotated_fraction == 0.75


def test_the_later_half_alone_judges_when_asked(monkeypatch):
    """``JUDGING = "later half"``: a split's error is the one the window's later half measures after
    the first half ranked and fitted; "both halves" averages it with the mirrored fold (the same
    window with its halves swapped)."""
    keys, values, queries, span, valid = layer_inputs(length=120, seed=3)
    layout = tiers.Layout(heads=KV_HEADS, head_dim=DIM, value_dim=DIM, rank=DIM // 2, element=4,
                          outside=(int((valid & ~span).sum()),), min_segment=2)
    allowed = layout.stored_bytes([int(span.sum()) // 2], [0])
    swapped = torch.cat([queries[:, :, WINDOW // 2:], queries[:, :, :WINDOW // 2]], dim=2)

    def errors(judging, window):
        monkeypatch.setattr(tiers, "JUDGING", judging)
        scored = tiers.choose_split(window, keys, values, span, DIM ** -0.5, layout, allowed, False)[2]
        return {split.rotated_fraction: split.error for split in scored}

    both, later, mirrored = errors("both halves", queries), errors("later half", queries), errors("later half", swapped)
    assert len(both) > 1 and both.keys() == later.keys() == mirrored.keys()
    for fraction in both:
        assert both[fraction] == pytest.approx((later[fraction] + mirrored[fraction]) / 2, rel=1e-5)
    assert any(later[f] != pytest.approx(both[f], rel=1e-3) for f in both)
    with pytest.raises(ValueError, match="rotatek judging 'later' is invalid: expected one of both halves, later half"):
        errors("later", queries)


def test_exact_first_resorts_only_each_heads_kept_tokens():
    # row 0 keeps 2 + 1 tokens, row 1 keeps 1 + 2: those are re-sorted by score (ties keep their
    # place), the dropped ones stay where the ranking put them
    order = torch.tensor([[[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]], [[2, 0, 1, 4, 3], [1, 2, 3, 4, 0]]])
    score = torch.tensor([[[0.1, 0.5, 0.3, 9.0, 9.0], [0.2, 0.2, 0.0, 0.7, 1.0]],
                          [[0.4, 0.4, 0.1, 0.0, 9.0], [0.0, 0.0, 0.5, 0.5, 9.0]]])
    resorted = tiers.exact_first(order, score, exact=(2, 1), rotated=(1, 2))
    assert resorted.tolist() == [[[1, 2, 0, 3, 4], [4, 3, 2, 1, 0]], [[0, 1, 2, 4, 3], [2, 3, 1, 4, 0]]]


def test_rotation_error_is_zero_inside_the_span_basis_and_not_outside():
    # Keys of rank 3 about a mean are reproduced exactly at r = 3; one token moved off that
    # subspace gets a logit error, the others (in that head) a small one
    keys, _, queries, span, _ = layer_inputs(length=60, seed=4, key_rank=3)
    keys = keys + torch.randn(DIM)
    offset = torch.zeros(DIM)
    offset[0] = 5.0
    keys[0, 1, 10] += offset
    mask = span[:, :keys.shape[2]]
    error = tiers.rotation_error(queries, keys, DIM ** -0.5, mask, rank=3)
    assert error.shape == (1, KV_HEADS, keys.shape[2])
    assert error[0, 0].abs().max() < 1e-3
    others = error[0, 1][mask[0] & (torch.arange(keys.shape[2]) != 10)]
    assert error[0, 1, 10] > 5 * others.max()  # the others move by its pull on the mean and basis only
    assert (error[~mask[:, None, :].expand_as(error)] == 0).all()


def test_share_times_rotation_error_keeps_the_kept_set_and_makes_the_worst_reproduced_exact(monkeypatch):
    """``EXACT_TIER = "share × rotation error"``: the chosen split keeps the same tokens as with the
    share ranking (its first E + T), and its exact tier holds the E of them with the largest score."""
    keys, values, queries, span, valid = layer_inputs(length=120, seed=5)
    n = int(span.sum())
    span_keys, span_values = keys[:, :, :n], values[:, :, :n]
    mask = span[:, :n]
    layout = tiers.Layout(heads=KV_HEADS, head_dim=DIM, value_dim=DIM, rank=DIM // 2, element=4,
                          outside=(int((valid & ~span).sum()),), min_segment=2)
    allowed = layout.stored_bytes([n // 4], [n // 2])
    scale = DIM ** -0.5

    def chosen(exact_tier):
        monkeypatch.setattr(tiers, "EXACT_TIER", exact_tier)
        monkeypatch.setattr(tiers, "SPLIT_RULE", "most rotated")
        split, order, _ = tiers.choose_split(queries, span_keys, span_values, mask, scale, layout, allowed, False)
        return split, order

    split, by_share = chosen("largest share")
    assert split.rotated_fraction > 0 and split.exact[0] > 0
    # the same split under the other exact tier (the choice itself may differ: compare at this one)
    share = tiers.window_share(queries, span_keys, scale, mask)
    score = share * tiers.rotation_error(queries, span_keys, scale, mask, DIM // 2)
    resorted = tiers.exact_first(by_share, score, split.exact, split.rotated)
    kept, exact = split.exact[0] + split.rotated[0], split.exact[0]
    for head in range(KV_HEADS):
        assert set(resorted[0, head, :kept].tolist()) == set(by_share[0, head, :kept].tolist())
        chosen_scores = score[0, head, resorted[0, head, :exact]]
        assert chosen_scores.min() >= score[0, head, resorted[0, head, exact:kept]].max()
        assert resorted[0, head, kept:].tolist() == by_share[0, head, kept:].tolist()
    other, order = chosen("share × rotation error")
    expected = tiers.exact_first(by_share, score, other.exact, other.rotated)
    assert torch.equal(order, expected)
    with pytest.raises(ValueError, match="rotatek exact tier 'norm' is invalid: expected one of largest share, "):
        chosen("norm")


def test_an_unknown_split_rule_is_refused_by_name():
    split = tiers.Split(rotated_fraction=0.0, exact=(1,), rotated=(1,), stored_bytes=1, error=1.0)
    with pytest.raises(ValueError, match="tie rule 'fewest'"):
        tiers.pick_split([split], "fewest")


@pytest.mark.parametrize("query_aware", [False, "auto"])
def test_rotatek_on_every_token_is_chosen_where_rotation_is_exact(query_aware):
    # Keys of rank 4 ≤ r = 8: rotating loses nothing, dropping does; with room for the rotated
    # form of every token, nothing is dropped and the decode output equals plain attention (the
    # exact tier, a per-head set of tokens in the rest segment, included). K-only PCA recovers
    # rank-4 Keys, the query-aware basis does not: allowed both (query_aware="auto"), the split is
    # judged with each and K-only PCA must win
    inputs = layer_inputs((0, 6), seed=6, key_rank=4)
    layer = compress(inputs, kv_budget=0.85, query_aware=query_aware)
    split = layer.split
    assert split.dropped == 0 and split.compressed == split.span - split.exact
    keys, values, _, _, valid = inputs
    query = torch.randn(2, KV_HEADS * GROUP, DIM, generator=torch.Generator().manual_seed(7))
    out = reference.decode_attention(query, *layer.span_key_parts, layer.span_values, layer.span_mask,
                                     layer.keys, layer.values, layer.mask, DIM ** -0.5)
    q = query.double().view(2, KV_HEADS, GROUP, DIM)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.double()) * DIM ** -0.5
    probs = logits.masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1)
    expected = torch.einsum("bhgs,bhsd->bhgd", probs, values.double()).reshape(2, -1, DIM)
    assert (out.double() - expected).abs().max() < 1e-4


def test_a_budget_that_cannot_be_met_keeps_the_layer_exact():
    # 40 span tokens: the basis (d·r + d per head) alone is more than 10% of their bytes
    layer = compress(layer_inputs(length=48), kv_budget=0.1)
    assert isinstance(layer, KeptExact) and "cannot be met" in layer.reason
    assert isinstance(compress(layer_inputs(), kv_budget=1.0), KeptExact)


def test_generate_with_a_budget():
    model = tiny_llama()
    prompt = dict(input_ids=torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(1)))
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    prompt["attention_mask"][1, :9] = 0
    model.compile(backend="rotatek", options={"kv_budget": 0.4, "inner": "eager"})
    out = generate(model, prompt, steps=4)
    assert all(torch.isfinite(x).all() for x in out.logits)
    assert all(attached(layer.keys) is not None for layer in output_cache(out).layers)
    split = rotatek_compile.span_split(output_cache(out))
    assert split.byte_ratio <= 0.4 and split.span == 2 * (2 * (120 - 32) - 9)  # 2 layers, 2 rows
    torch._dynamo.reset()
    explanation = rotatek_compile.explain(tiny_llama(), prompt, kv_budget=0.4, inner="eager")
    assert "kept exact" in str(explanation) and explanation.span.byte_ratio <= 0.4
