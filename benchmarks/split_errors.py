"""The tiered cache's candidate splits, as its proxy scores them, on the tuning prompts.

    python benchmarks/split_errors.py [--budgets 0.4] [--out DIR]

Runs ``benchmarks/fidelity.py``'s 24 SmolLM2 prompts with the adaptive tiered cache and records,
for every layer of every tuning prompt (even index), each candidate split's held-out window error
(``rotatek_compile.tiers.pick_split``'s input). Held-out prompts run too (the prompts and caches
are those of the sweep) but their errors are not kept. Prints, per budget and tuning prompt,
token-only's KL from ``--kl`` (a ``tiered_rule.py`` JSON) next to quantiles of token-only's split
error over the layers, and the floor fitted on them (:func:`fit_floor`: ``tiers.TOKEN_ONLY_FLOOR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fidelity  # noqa: E402
from rotatek_compile import tiers  # noqa: E402


EASY_KL = 0.01  # a tuning prompt on which token-only's KL is below this is "easy"
FLOOR_QUANTILE = 0.75


def fit_floor(layers_by_prompt: dict[int, list[dict[float, float]]], token_kl: list[float]) -> float:
    """The :data:`FLOOR_QUANTILE` quantile (lower) of token-only's per-layer split error over the
    layers of the prompts whose token-only KL is below :data:`EASY_KL` (``docs/fidelity.md``)."""
    errors = sorted(layer[0.0] for prompt, layers in layers_by_prompt.items() if token_kl[prompt] < EASY_KL
                    for layer in layers)
    if not errors:
        raise ValueError("split_errors: no tuning prompt has a token-only KL below the easy level")
    return errors[int(FLOOR_QUANTILE * (len(errors) - 1))]


def recorder(records: dict[str, dict[int, list[dict[float, float]]]], current: dict, pick):
    """``pick`` (``tiers.pick_split``) that first records the candidates' errors of the tuning
    prompt (even index) and budget in ``current``, for the budgets ``records`` holds."""
    def recorded(scored, rule=None):
        if current["prompt"] % 2 == 0 and current["budget"] in records:  # tuning prompts only
            records[current["budget"]].setdefault(current["prompt"], []).append(
                {split.rotated_fraction: split.error for split in scored})
        return pick(scored, rule)

    return recorded


def arguments(doc: str) -> argparse.Namespace:
    """The command line of this script and of ``dropped_mass.py``, which records other statistics
    on the same sweep."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.4")
    parser.add_argument("--kl", type=Path,
                        default=Path("benchmarks/results/tiered_rule_2026-11-30/tiered_rule_smollm2.json"))
    parser.add_argument("--out", type=Path, default=Path("."))
    return parser.parse_args()


def sweep(budgets: list[float], current: dict) -> None:
    """``fidelity.py``'s 24 SmolLM2 prompts with token-only, then the adaptive tiered cache at each
    of ``budgets``; while a cell runs, ``current`` holds its prompt and budget (``"None"`` for the
    token-only cell), which a recorder patched into the product reads."""
    import torch

    torch.set_num_threads(2)
    run_cell = fidelity.cell_run

    def cell_run(compiled, model, backend, cell, group, *rest, **kwargs):
        current.update(budget=str(cell.kv_budget), prompt=group)
        return run_cell(compiled, model, backend, cell, group, *rest, **kwargs)

    # a token-only cell first: the sweep's backend compiles its decode graphs with the first cell's
    # config, for every method, and kv_budget is RotateK's alone
    cells = [fidelity.Cell("token-only", "think", 1.0, budgets[0])]
    cells += [fidelity.Cell("tiered most rotated", "rotatek", 0.5, 1.0, kv_budget=b) for b in budgets]
    fidelity.cell_run = cell_run
    try:
        fidelity.run_model("smollm2", fidelity.FULL_LENGTHS, cells, fidelity.STEPS)
    finally:
        fidelity.cell_run = run_cell


def token_only_kl(path: Path, budget: float) -> list[float]:
    """Token-only's per-prompt KL at ``budget`` from a ``tiered_rule.py`` JSON."""
    cells = json.loads(path.read_text())["cells"]
    return cells[fidelity.Cell("token-only", "think", 1.0, budget).name]["per_prompt"]["kl"]


def main() -> None:
    args = arguments(__doc__)
    budgets = [float(b) for b in args.budgets.split(",")]
    records: dict[str, dict[int, list[dict[float, float]]]] = {str(b): {} for b in budgets}
    current: dict = {}
    pick = tiers.pick_split
    tiers.pick_split = recorder(records, current, pick)
    try:
        sweep(budgets, current)
    finally:
        tiers.pick_split = pick
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split_errors.json").write_text(json.dumps(records))
    for budget in budgets:
        token_kl = token_only_kl(args.kl, budget)
        print(f"budget {budget}: prompt, token-only KL, token-only split error over layers (min / median / max)")
        for prompt, layers in sorted(records[str(budget)].items()):
            errors = sorted(layer.get(0.0, float("nan")) for layer in layers)
            print(f"  {prompt:2d}  {token_kl[prompt]:.4f}  {errors[0]:.2e} / {errors[len(errors) // 2]:.2e} / "
                  f"{errors[-1]:.2e}")
        print(f"floor (the {FLOOR_QUANTILE:g} quantile of token-only's error over the layers of prompts with "
              f"token-only KL < {EASY_KL:g}): {fit_floor(records[str(budget)], token_kl):.4g}")


if __name__ == "__main__":
    main()
