"""Whether the window attention that token-only pruning drops tells SmolLM2's easy prompts from its
hard ones (issue: the adaptive tiered cache needs a signal other than the window's output error).

    python benchmarks/dropped_mass.py [--budgets 0.4] [--out DIR]

Runs ``benchmarks/fidelity.py``'s 24 SmolLM2 prompts with the adaptive tiered cache, as
``benchmarks/split_errors.py`` does, and records for every layer of every tuning prompt (even
index) the share of the window's attention over the span (sinks aside) that falls on the tokens
token-only drops at that budget:

- in-sample: the whole window ranks the tokens and its own attention is measured;
- held-out: each half of the window ranks them and the other half's attention is measured
  (averaged over the two folds), as the split proxy does.

It also records the share of the span Keys' centred energy outside their top-r principal subspace
(:func:`key_residual`: what a rotated tier's basis cannot keep). Prints per tuning prompt
token-only's KL (from ``--kl``, a ``tiered_rule.py`` JSON) next to the median over the layers of
each. Nothing here is fitted; the held-out prompts'
values are not kept.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import split_errors  # noqa: E402
from rotatek_compile import tiers  # noqa: E402


def dropped_share(rank_queries, judge_queries, keys, mask, scale: float, exact: tuple[int, ...]) -> float:
    """Share of ``judge_queries``' window attention over the span on the tokens outside the top
    ``exact[b]`` of each head's ranking by ``rank_queries`` (mean over rows and KV heads)."""
    order = tiers.ranking(tiers.window_share(rank_queries, keys, scale, mask), mask)
    share = tiers.window_share(judge_queries, keys, scale, mask)  # [B, H, N], rows sum to 1
    kept, _ = tiers.tier_masks(order, exact, (0,) * len(exact))
    return float((share * ~kept).sum(dim=-1).mean())


def key_residual(keys, mask, rank: int) -> float:
    """Share of the span Keys' centred energy outside their top-``rank`` principal subspace (K-only
    PCA, per row and KV head, then the mean): what a rotated tier's basis cannot keep."""
    import torch

    x = keys.float()
    weight = mask[:, None, :, None].float()  # [B, 1, N, 1]
    mean = (x * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True).clamp_min(1)
    centred = (x - mean) * weight
    values = torch.linalg.eigvalsh(centred.transpose(-1, -2) @ centred)  # [B, H, d] ascending
    total = values.sum(dim=-1).clamp_min(1e-30)
    return float((values[..., :-rank].sum(dim=-1) / total).mean()) if rank < values.shape[-1] else 0.0


def recorder(records: dict, current: dict, choose):
    """``tiers.choose_split`` that also records, for tuning prompts, token-only's dropped shares."""
    def chosen(queries, keys, values, mask, scale, layout, allowed, query_aware):
        result = choose(queries, keys, values, mask, scale, layout, allowed, query_aware)
        _, _, splits = result
        token_only = next((s for s in splits if s.rotated_fraction == 0), None)
        if current["prompt"] % 2 == 0 and current["budget"] in records and token_only is not None:
            half = queries.shape[2] // 2
            first, second = queries[:, :, :half], queries[:, :, half:]
            held_out = (dropped_share(first, second, keys, mask, scale, token_only.exact)
                        + dropped_share(second, first, keys, mask, scale, token_only.exact)) / 2
            records[current["budget"]].setdefault(current["prompt"], []).append(dict(
                in_sample=dropped_share(queries, queries, keys, mask, scale, token_only.exact),
                held_out=held_out, error=token_only.error, key_residual=key_residual(keys, mask, layout.rank)))
        return result

    return chosen


def main() -> None:
    args = split_errors.arguments(__doc__)
    budgets = [float(b) for b in args.budgets.split(",")]
    records: dict[str, dict[int, list[dict]]] = {str(b): {} for b in budgets}
    current: dict = {}
    choose = tiers.choose_split
    tiers.choose_split = recorder(records, current, choose)
    try:
        split_errors.sweep(budgets, current)
    finally:
        tiers.choose_split = choose
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dropped_mass.json").write_text(json.dumps(records))
    for budget in budgets:
        token_kl = split_errors.token_only_kl(args.kl, budget)
        print(f"budget {budget}: prompt, token-only KL, median over layers of token-only's dropped window "
              "share (in-sample, held-out), of its split error, and of the span Keys' energy outside rank r")
        for prompt, layers in sorted(records[str(budget)].items()):
            medians = [statistics.median(layer[key] for layer in layers)
                       for key in ("in_sample", "held_out", "error", "key_residual")]
            print(f"  {prompt:2d}  {token_kl[prompt]:.4f}  {medians[0]:.4f}  {medians[1]:.4f}  {medians[2]:.2e}  "
                  f"{medians[3]:.4f}")


if __name__ == "__main__":
    main()
