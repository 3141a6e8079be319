"""Which split the adaptive tiered cache takes among near-ties: fitted on the tuning prompts.

    python benchmarks/tiered_rule.py [--models smollm2,gemma3] [--rules "most rotated,least rotated"]
        [--judging "later half"] [--exact-tier "share × rotation error"] [--out DIR]

``rotatek_compile.tiers.pick_split`` keeps, of the candidate splits whose held-out window error is
within ``TIE_TOLERANCE`` of the smallest, the one that rotates the most tokens ("most rotated"), the
fewest ("least rotated", token-only when it is among them), or token-only when it is among them and
else the most rotated ("token-only when tied"); or token-only wherever its own error is at most
``TOKEN_ONLY_FLOOR``, else the most rotated ("token-only below a floor"). ``--rules`` picks the
rules to run (default: the first two); ``--judging`` which queries of the window judge a split
(``rotatek_compile.tiers.JUDGING``: "both halves", the default, or "later half"); ``--exact-tier``
which of a split's kept tokens stay exact (``rotatek_compile.tiers.EXACT_TIER``: "largest share",
the default, or "share × rotation error"). For each model this runs the 24
prompts of ``benchmarks/fidelity.py`` (one process per model, in parallel) with token-only and the
adaptive tiered cache under each rule, at every budget, and prints per rule and budget the mean-KL
ratio to token-only and the geometric mean of per-prompt ratios, on the tuning prompts (where the
rule is chosen) and on the held-out ones (what is reported). JSON per model under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fidelity  # noqa: E402
import fidelity_report  # noqa: E402
from rotatek_compile import tiers  # noqa: E402

RULES = ("most rotated", "least rotated")  # the comparison of the first run; --rules picks others
logger = logging.getLogger("tiered_rule")


def cells(rules: tuple[str, ...] = RULES) -> list[fidelity.Cell]:
    out = [fidelity.Cell("token-only", "think", 1.0, budget) for budget in fidelity.BUDGETS]
    out += [fidelity.Cell(f"tiered {rule}", "rotatek", 0.5, 1.0, kv_budget=budget)
            for rule in rules for budget in fidelity.BUDGETS]
    return out


def rules_of(result: dict) -> list[str]:
    """The tie rules a result holds cells of."""
    return [rule for rule in tiers.SPLIT_RULES if any(name.startswith(f"tiered {rule} ") for name in result["cells"])]


def _with_rule(cell_run):
    """``fidelity.cell_run`` that sets the tie rule named by the cell's label first."""
    from rotatek_compile import tiers

    def run(compiled, model, backend, cell, *args, **kwargs):
        tiers.SPLIT_RULE = cell.label.removeprefix("tiered ") if cell.label.startswith("tiered ") else "most rotated"
        return cell_run(compiled, model, backend, cell, *args, **kwargs)

    return run


def run_one(model: str, out: Path, position: int, lengths: tuple[int, ...], steps: int,
            rules: tuple[str, ...] = RULES, judging: str = tiers.JUDGING,
            exact_tier: str = tiers.EXACT_TIER) -> Path:
    import torch

    torch.set_num_threads(1)
    tiers.JUDGING = judging
    tiers.EXACT_TIER = exact_tier
    fidelity.cell_run = _with_rule(fidelity.cell_run)
    result = fidelity.run_model(model, lengths, cells(rules), steps, progress_position=position,
                                partial=out / f"tiered_rule_{model}.partial.json")
    result["judging"] = judging
    result["exact_tier"] = exact_tier
    path = out / f"tiered_rule_{model}.json"
    path.write_text(json.dumps(fidelity._jsonable(result)))
    return path


def summary(result: dict) -> list[dict]:
    """Per rule, budget and prompt half: mean-KL ratio and geo-mean of per-prompt ratios."""
    rows = []
    for budget in fidelity.BUDGETS:
        base = result["cells"][fidelity.Cell("token-only", "think", 1.0, budget).name]
        for rule in rules_of(result):
            tiered = result["cells"][fidelity.Cell(f"tiered {rule}", "rotatek", 0.5, 1.0, kv_budget=budget).name]
            row = {"model": result["model"], "budget": budget, "rule": rule}
            for half, tuning in (("tuning", True), ("held-out", False)):
                prompts = fidelity_report.prompts_of(result, tuning)
                mine, theirs = (fidelity_report.values(r, "kl", prompts) for r in (tiered, base))
                pairs = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
                row[half] = {
                    "mean_ratio": sum(a for a, _ in pairs) / sum(b for _, b in pairs),
                    "geo_mean": fidelity_report.geo_mean([a / b for a, b in pairs]),
                    "wins": sum(a < b for a, b in pairs), "prompts": len(pairs)}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    halves = " | ".join(f"{half}: mean KL ratio / geo-mean / wins" for half in ("tuning", "held-out"))
    lines = [f"| model | budget | rule | {halves} |", "|---|---|---|---|---|"]
    for row in rows:
        cells_ = [f"{row[h]['mean_ratio']:.3f} / {row[h]['geo_mean']:.3f} / {row[h]['wins']}/{row[h]['prompts']}"
                  for h in ("tuning", "held-out")]
        lines.append(f"| {row['model']} | {row['budget']:g} | {row['rule']} | {cells_[0]} | {cells_[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(fidelity.MODELS))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--lengths", default=None, help="prompt lengths (default: fidelity.py's 24 prompts)")
    parser.add_argument("--steps", type=int, default=fidelity.STEPS)
    parser.add_argument("--report-only", action="store_true", help="summarise the JSON already under --out")
    parser.add_argument("--rules", default=",".join(RULES),
                        help=f"comma-separated tie rules, of {', '.join(tiers.SPLIT_RULES)}")
    parser.add_argument("--judging", default=tiers.JUDGING,
                        help=f"which window queries judge a split, of {', '.join(tiers.JUDGINGS)}")
    parser.add_argument("--exact-tier", default=tiers.EXACT_TIER,
                        help=f"which kept tokens stay exact, of {', '.join(tiers.EXACT_TIERS)}")
    args = parser.parse_args()
    if args.judging not in tiers.JUDGINGS:
        parser.error(f"--judging: unknown {args.judging!r}; expected one of {', '.join(tiers.JUDGINGS)}")
    if args.exact_tier not in tiers.EXACT_TIERS:
        parser.error(f"--exact-tier: unknown {args.exact_tier!r}; expected one of {', '.join(tiers.EXACT_TIERS)}")
    rules = tuple(args.rules.split(","))
    unknown = [rule for rule in rules if rule not in tiers.SPLIT_RULES]
    if unknown:
        parser.error(f"--rules: unknown tie rule(s) {unknown}; expected of {', '.join(tiers.SPLIT_RULES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    if not args.report_only:
        with multiprocessing.get_context("spawn").Pool(len(models)) as pool:
            lengths = tuple(int(n) for n in args.lengths.split(",")) if args.lengths else fidelity.FULL_LENGTHS
            pool.starmap(run_one, [(model, args.out, i, lengths, args.steps, rules, args.judging, args.exact_tier)
                                   for i, model in enumerate(models)])
    rows = [row for model in models
            for row in summary(json.loads((args.out / f"tiered_rule_{model}.json").read_text()))]
    (args.out / "tiered_rule.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
