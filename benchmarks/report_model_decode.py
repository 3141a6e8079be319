"""Table and plot of ``benchmarks/model_decode.py`` results (JSON files), for docs/performance.md.

    python benchmarks/report_model_decode.py benchmarks/results/model_decode_h100.json \
        benchmarks/results/model_decode_h100_rotatek_final.json --plot docs/model_decode.png

    python benchmarks/report_model_decode.py --by-recipe \
        benchmarks/results/h200_2026-11-30/model_decode_part*.json --plot docs/model_decode_h200.png

Later files override earlier ones for the same (backend, batch, span). ``--by-recipe``: one table
row per (batch, N, recipe) with its byte floor, and a plot of every recipe at batch 1 (the
default compares ``inductor`` with ``rotatek``).
"""

from __future__ import annotations

import argparse
import json

LAYERS_OF_8B = 32


def load(paths: list[str]) -> tuple[dict, dict]:
    rows, meta = {}, {}
    for path in paths:
        with open(path) as handle:
            report = json.load(handle)
        meta = report
        for row in report["results"]:
            if "error" not in row:
                rows[(row["backend"], row["batch"], row["span"])] = row
    return rows, meta


def table(rows: dict, meta: dict) -> str:
    weights = meta["weight_bytes"]
    lines = ["| B | N | decode ms/step inductor | rotatek | speedup | byte-ratio ideal | prefill ms inductor | "
             "rotatek | of which compression | peak GB inductor | rotatek | Key bytes rotatek/inductor | "
             "KV bytes | recompiles (timed steps) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (backend, batch, span), base in sorted(rows.items(), key=lambda item: (item[0][1], item[0][2])):
        ours = rows.get(("rotatek", batch, span))
        if backend != "inductor" or ours is None:
            continue
        ideal = (weights + base["kv_bytes"]) / (weights + ours["kv_bytes"])
        lines.append(
            f"| {batch} | {span} | {base['decode_ms']:.2f} | {ours['decode_ms']:.2f} | "
            f"{base['decode_ms'] / ours['decode_ms']:.2f}× | {ideal:.3f}× | {base['prefill_ms']:.0f} | "
            f"{ours['prefill_ms']:.0f} | {ours['compression_ms']:.0f} | {base['peak_gb']:.1f} | {ours['peak_gb']:.1f} | "
            f"{ours['key_bytes'] / base['key_bytes']:.3f} | {ours['kv_bytes'] / base['kv_bytes']:.3f} | "
            f"{base['recompiles']} / {ours['recompiles']} |")
    return "\n".join(lines)


def kv_per_sequence(rows: dict, meta: dict, span: int) -> str:
    """Measured KV bytes of one ``span``-token sequence, scaled from the layers that ran to 32."""
    parts = []
    for backend in ("inductor", "rotatek"):
        row = rows.get((backend, 1, span))
        if row is not None:
            kv_32 = row["kv_bytes"] / meta["layers"] * LAYERS_OF_8B / 1e9
            parts.append(f"{backend}: {kv_32:.2f} GB")
    return "; ".join(parts)


def recipe_table(rows: dict) -> str:
    """Every (batch, N, recipe): decode ms/step against its byte floor, prefill, memory, bytes."""
    lines = ["| B | N | recipe | decode ms/step | byte floor ms | × floor | prefill ms | of it compression ms | "
             "prefill peak GB | Key GB | KV GB | recompiles (timed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (backend, batch, span), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][2], item[0][0])):
        lines.append(
            f"| {batch} | {span // 1024}k | {backend} | {row['decode_ms']:.2f} | {row['floor_ms']:.2f} | "
            f"{row['decode_ms'] / row['floor_ms']:.2f} | {row['prefill_ms']:.0f} | {row['compression_ms']:.0f} | "
            f"{row['prefill_peak_gb']:.2f} | {row['key_bytes'] / 1e9:.3f} | {row['kv_bytes'] / 1e9:.3f} | "
            f"{row['recompiles']} |")
    return "\n".join(lines)


def plot(rows: dict, path: str, title: str, backends: tuple = (), floors: bool = False) -> None:
    """Decode ms/step against context length at batch 1 for ``backends`` (default: every recipe
    in ``rows``), and with ``floors`` each one's byte floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.8))
    for backend in backends or sorted({b for b, batch, _ in rows if batch == 1}):
        points = sorted((span + 60, row["decode_ms"], row.get("floor_ms")) for (b, batch, span), row in rows.items()
                        if b == backend and batch == 1)
        line, = axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=backend)
        if floors:
            axis.plot([p[0] for p in points], [p[2] for p in points], ":", color=line.get_color(),
                      label=f"{backend}: byte floor")
    axis.set_xscale("log", base=2)
    if floors:
        axis.set_yscale("log")
    axis.set_xlabel("context tokens (batch 1)")
    axis.set_ylabel("decode ms / step (median)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot")
    parser.add_argument("--by-recipe", action="store_true", help="every recipe, each against its byte floor")
    args = parser.parse_args()
    rows, meta = load(args.results)
    if args.by_recipe:
        print(recipe_table(rows))
        if args.plot:
            plot(rows, args.plot, f"8B-shaped Llama, {meta['layers']} layers, bf16, {meta['device']}", floors=True)
        return
    print(table(rows, meta))
    print()
    print("KV per 64k-token sequence, 32 layers:", kv_per_sequence(rows, meta, 65536))
    if args.plot:
        plot(rows, args.plot, "8B-shaped Llama, 8 of 32 layers, bf16, H100", backends=("inductor", "rotatek"))


if __name__ == "__main__":
    main()
