"""Tables, targets and plots of ``benchmarks/fidelity.py``'s results (held-out prompts).

Every figure is a mean over the *held-out* prompts (odd prompt indices) unless it says otherwise;
the tuning prompts (even indices) only choose the fixed tiered split that is reported as "fixed
split (fitted)". Bytes are measured true bytes of the span (every stored tensor, the basis, masks
and attention sinks included) over the span's uncompressed K+V bytes.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

LABEL = {"exact": "exact (RotateK r = d)", "token-only": "token-only", "tiered": "tiered (adaptive)",
         "rotatek": "RotateK", "rotatek-konly": "RotateK, K-only PCA", "think": "ThinK", "spark": "SparK-style"}
BEGIN, END = "<!-- BEGIN GENERATED: benchmarks/fidelity.py -->", "<!-- END GENERATED -->"


def _cells(result: dict, label: str) -> list[tuple[str, dict]]:
    return [(name, c) for name, c in result["cells"].items() if c["cell"]["label"] == label]


def prompts_of(result: dict, tuning: bool) -> list[int]:
    return [i for i, p in enumerate(result["prompts"]) if p["tuning"] == tuning]


def values(record: dict, key: str, prompts: list[int]) -> list[Optional[float]]:
    """Per prompt: ``key`` (a metric, or ``"bytes"``: the measured span ratio), ``None`` where the
    cell could not run as asked (a fixed split that does not fit)."""
    out = []
    for i in prompts:
        if i >= len(record["bytes"]) or not record["feasible"][i]:
            out.append(None)
        elif key == "bytes":
            out.append(record["bytes"][i]["span_ratio"])
        else:
            out.append(record["per_prompt"][key][i])
    return out


def mean(xs: list[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def geo_mean(xs: list[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def ppl_ratio(record: dict, prompts: list[int]) -> Optional[float]:
    ratios = [a / b if a is not None else None for a, b in
              zip(values(record, "ppl", prompts), values(record, "ppl_exact", prompts))]
    return geo_mean(ratios)


def _f(value: Optional[float], fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# --- tables ------------------------------------------------------------------------------------------


def all_cells_table(result: dict) -> str:
    held = prompts_of(result, False)
    lines = [f"| cell | span bytes | KL (nats/token) | greedy agree | greedy prefix | PPL ratio | "
             f"exact / rotated / dropped tokens | bytes check |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, record in result["cells"].items():
        kl = mean(values(record, "kl", held))
        if kl is None:
            continue
        spans = [b for i, b in enumerate(record["bytes"]) if i in held and b and b["span_tokens"]]
        tokens = sum(b["span_tokens"] for b in spans)
        split = " / ".join(f"{sum(b[k] for b in spans) / max(tokens, 1):.2f}" for k in ("exact", "rotated", "dropped"))
        rows.append((mean(values(record, "bytes", held)), name, kl, record, split))
    for bytes_, name, kl, record, split in sorted(rows, key=lambda r: (-(r[0] or 0), r[1])):
        lines.append(f"| {name} | {_f(bytes_)} | {kl:.4f} | {_pct(mean(values(record, 'agree', held)))} | "
                     f"{_pct(mean(values(record, 'prefix', held)))} | {_f(ppl_ratio(record, held))} | {split} | "
                     f"{'ok' if record['bytes_ok'] else 'MISMATCH'} |")
    return "\n".join(lines)


def fitted_split(result: dict, budget: float) -> Optional[tuple[str, dict]]:
    """The fixed tiered split with the lowest mean KL on the tuning prompts at ``budget``."""
    tuning = prompts_of(result, True)
    fixed = [(name, c) for name, c in _cells(result, "tiered")
             if c["cell"]["kv_budget"] == budget and c["cell"]["rotated"] is not None]
    scored = [(mean(values(c, "kl", tuning)), name, c) for name, c in fixed
              if all(v is not None for v in values(c, "kl", tuning))]
    return min(scored)[1:] if scored else None


def tiered_comparison(result: dict) -> list[dict[str, Any]]:
    """Per budget, on the held-out prompts: tiered (adaptive and the fitted fixed split) vs
    token-only at the same budget, paired by prompt."""
    held = prompts_of(result, False)
    rows = []
    for budget in sorted({c["cell"]["kv_budget"] for _, c in _cells(result, "tiered")}):
        token = next((c for _, c in _cells(result, "token-only") if c["cell"]["token_keep"] == budget), None)
        tiered = next((c for _, c in _cells(result, "tiered")
                       if c["cell"]["kv_budget"] == budget and c["cell"]["rotated"] is None), None)
        if token is None or tiered is None:
            continue
        row = {"budget": budget, "token_bytes": mean(values(token, "bytes", held)),
               "token_kl": mean(values(token, "kl", held))}
        for key, record in (("tiered", tiered), ("fixed", (fitted_split(result, budget) or (None, None))[1])):
            if record is None:
                continue
            kl, base = values(record, "kl", held), values(token, "kl", held)
            pairs = [(a, b) for a, b in zip(kl, base) if a is not None and b is not None]
            row[f"{key}_bytes"] = mean(values(record, "bytes", held))
            row[f"{key}_kl"] = mean(kl)
            row[f"{key}_mean_ratio"] = mean(kl) / row["token_kl"] if row["token_kl"] else None
            row[f"{key}_ratios"] = [a / b for a, b in pairs]
            row[f"{key}_geo"] = geo_mean(row[f"{key}_ratios"])
            row[f"{key}_wins"] = (sum(a < b for a, b in pairs), len(pairs))
            spans = [b for i, b in enumerate(record["bytes"]) if i in held and b and b["span_tokens"]]
            row[f"{key}_rotated"] = sum(b["rotated"] for b in spans) / max(sum(b["span_tokens"] for b in spans), 1)
            if key == "fixed":
                row["fixed_t"] = record["cell"]["rotated"][0]
        rows.append(row)
    return rows


def tiered_table(result: dict) -> str:
    lines = ["| budget | token-only: bytes / KL | tiered: bytes / KL / rotated share | tiered / token-only: "
             "mean KL ratio, geo-mean of per-prompt ratios, wins | fixed split (t fitted on tuning): t / KL / "
             "mean ratio / geo-mean / wins |",
             "|---|---|---|---|---|"]
    for row in tiered_comparison(result):
        fixed = "n/a"
        if "fixed_kl" in row:
            fixed = (f"{row['fixed_t']:g} / {row['fixed_kl']:.4f} / {_f(row['fixed_mean_ratio'])} / "
                     f"{_f(row['fixed_geo'])} / {row['fixed_wins'][0]}/{row['fixed_wins'][1]}")
        lines.append(f"| {row['budget']:g} | {_f(row['token_bytes'])} / {row['token_kl']:.4f} | "
                     f"{_f(row['tiered_bytes'])} / {row['tiered_kl']:.4f} / {row['tiered_rotated']:.2f} | "
                     f"{_f(row['tiered_mean_ratio'])}, {_f(row['tiered_geo'])}, "
                     f"{row['tiered_wins'][0]}/{row['tiered_wins'][1]} | {fixed} |")
    lines.append("")
    lines.append("Per-prompt KL ratios tiered / token-only (held-out prompts, in order: "
                 + ", ".join(f"{result['prompts'][i]['kind']} {result['prompts'][i]['tokens']}"
                             for i in prompts_of(result, False)) + "):")
    lines.append("")
    for row in tiered_comparison(result):
        lines.append(f"- budget {row['budget']:g}: " + ", ".join(f"{r:.2f}" for r in row["tiered_ratios"]))
    return "\n".join(lines)


def _curve(result: dict, label: str, prompts: list[int]) -> list[tuple[float, float]]:
    """A channel method's (bytes, KL) points at token keep 1, closed by (1, 0): all channels kept."""
    pts = [(mean(values(c, "bytes", prompts)), mean(values(c, "kl", prompts)))
           for _, c in _cells(result, label) if c["cell"]["token_keep"] == 1.0]
    return sorted([p for p in pts if None not in p] + [(1.0, 0.0)])


def interpolate(points: list[tuple[float, float]], x: float) -> Optional[float]:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (0.0 if x1 == x0 else (x - x0) / (x1 - x0)) * (y1 - y0)
    return None


def channel_comparison(result: dict) -> list[dict[str, Any]]:
    held = prompts_of(result, False)
    curves = {label: _curve(result, label, held) for label in ("think", "spark", "rotatek-konly")}
    rows = []
    for _, record in sorted(_cells(result, "rotatek"), key=lambda x: x[1]["cell"]["ratio"]):
        if record["cell"]["token_keep"] != 1.0:
            continue
        bytes_ = mean(values(record, "bytes", held))
        row = {"ratio": record["cell"]["ratio"], "bytes": bytes_, "rotatek": mean(values(record, "kl", held))}
        for label, curve in curves.items():
            row[label] = interpolate(curve, bytes_)
            same_r = next((c for _, c in _cells(result, label) if c["cell"]["ratio"] == record["cell"]["ratio"]), None)
            row[f"{label}_same_r"] = (mean(values(same_r, "bytes", held)), mean(values(same_r, "kl", held))) \
                if same_r else (None, None)
        rows.append(row)
    return rows


def channel_table(result: dict) -> str:
    lines = ["| r/d | RotateK bytes / KL | ThinK KL at RotateK's bytes (same r: bytes / KL) | SparK-style KL at "
             "RotateK's bytes (same r: bytes / KL) | K-only PCA KL at RotateK's bytes |",
             "|---|---|---|---|---|"]
    for row in channel_comparison(result):
        same = {k: row[f"{k}_same_r"] for k in ("think", "spark")}
        lines.append(f"| {row['ratio']:g} | {_f(row['bytes'])} / {row['rotatek']:.4f} | {_f(row['think'], '.4f')} "
                     f"({_f(same['think'][0])} / {_f(same['think'][1], '.4f')}) | {_f(row['spark'], '.4f')} "
                     f"({_f(same['spark'][0])} / {_f(same['spark'][1], '.4f')}) | {_f(row['rotatek-konly'], '.4f')} |")
    return "\n".join(lines)


def sanity_line(result: dict) -> str:
    exact = next(c for _, c in _cells(result, "exact"))
    every = list(range(len(result["prompts"])))
    return (f"sanity row (RotateK r = d, every prompt): max KL over all positions {exact['kl_all_max']:.1e}, "
            f"greedy agreement {_pct(mean(values(exact, 'agree', every)))}, PPL ratio "
            f"{_f(ppl_ratio(exact, every), '.6f')}; bytes checks: "
            + ("all ok" if all(c["bytes_ok"] for c in result["cells"].values()) else "MISMATCH"))


def targets(result: dict) -> list[str]:
    """The issue's targets on this model's held-out prompts, each met or missed."""
    out = []
    for row in tiered_comparison(result):
        if row["budget"] <= 0.5:
            ok = row["tiered_mean_ratio"] is not None and row["tiered_mean_ratio"] <= 0.85
            out.append(f"{'met' if ok else 'MISSED'}: tiered mean KL ≤ 0.85× token-only at {row['budget']:g} "
                       f"(ratio {_f(row['tiered_mean_ratio'])})")
        ok = row["tiered_geo"] is not None and row["tiered_geo"] <= 1.0
        out.append(f"{'met' if ok else 'MISSED'}: geo-mean of per-prompt KL ratios ≤ 1 at {row['budget']:g} "
                   f"({_f(row['tiered_geo'])})")
    for row in channel_comparison(result):
        for other in ("think", "spark"):
            if row[other] is None:  # the rival has no point at RotateK's bytes: no comparison
                out.append(f"not comparable: RotateK vs {LABEL[other]} at r/d = {row['ratio']:g} (no "
                           f"{LABEL[other]} points on both sides of RotateK's {row['bytes']:.3f} of the span bytes)")
                continue
            ok = row["rotatek"] <= row[other]
            out.append(f"{'met' if ok else 'MISSED'}: RotateK ≤ {LABEL[other]} at equal true bytes, r/d = "
                       f"{row['ratio']:g} ({row['rotatek']:.4f} vs {row[other]:.4f})")
    return out


def report(results: list[dict]) -> str:
    body = []
    for result in results:
        held, tune = prompts_of(result, False), prompts_of(result, True)
        body += [f"### {result['model']} (d = {result['head_dim']}, {result['compressed_layers']} of "
                 f"{result['layers']} layers compressed; {len(tune)} tuning + {len(held)} held-out prompts of "
                 + ", ".join(sorted({str(p['tokens']) for p in result['prompts']})) + " tokens; "
                 f"{result['steps']}-token continuations)", "",
                 sanity_line(result), "",
                 "#### Tiered cache vs token-only (held-out)", "", tiered_table(result), "",
                 "#### Channel methods at equal true bytes (held-out, token keep 1)", "", channel_table(result), "",
                 "#### Targets", ""] + [f"- {t}" for t in targets(result)] + [
                 "", "#### Every cell (held-out means)", "", all_cells_table(result), ""]
    return "\n".join(body)


# --- plot --------------------------------------------------------------------------------------------


def plot(results: list[dict], path: Path) -> Path:
    """KL vs true span bytes, one panel per model, held-out means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"token-only": ("C3", "D", "-"), "tiered": ("C0", "o", "-"), "rotatek": ("C0", "s", "--"),
              "think": ("C1", "^", "--"), "spark": ("C2", "v", "--"), "rotatek-konly": ("C0", "x", ":")}
    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.8), squeeze=False)
    for ax, result in zip(axes[0], results):
        held = prompts_of(result, False)
        for label, (color, marker, line) in styles.items():
            pts = sorted((mean(values(c, "bytes", held)), mean(values(c, "kl", held)))
                         for _, c in _cells(result, label)
                         if c["cell"].get("rotated") is None and mean(values(c, "kl", held)) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], line, color=color, marker=marker,
                        label=LABEL[label])
        fixed = [(mean(values(c, "bytes", held)), mean(values(c, "kl", held)))
                 for _, c in _cells(result, "tiered") if c["cell"].get("rotated") is not None]
        fixed = [p for p in fixed if None not in p]
        if fixed:
            ax.plot([p[0] for p in fixed], [p[1] for p in fixed], ".", color="C0", alpha=0.5,
                    label="tiered, fixed splits")
        ax.set_yscale("log")
        ax.set_xlabel("span KV bytes / uncompressed (true bytes, measured)")
        ax.set_ylabel("next-token KL, nats/token (held-out mean)")
        ax.set_title(result["model"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(results: list[dict], out_dir: Path, header: str) -> Path:
    """``fidelity.md`` (the generated block replaced in place) and ``fidelity_kl.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(results, out_dir / "fidelity_kl.png")
    generated = "\n".join([BEGIN, "", header, "", report(results), f"![{png.stem}]({png.name})", "", END])
    path = out_dir / "fidelity.md"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + generated + (rest.split(END, 1)[1] if END in rest else "")
    else:
        text = "# Fidelity on real weights\n\n" + generated + "\n"
    path.write_text(text)
    return path


def load(paths: list[Path]) -> list[dict]:
    return [json.loads(p.read_text()) for p in paths]
