"""Per-architecture report: sites rewritten/left exact, exactness, span and Key bytes (tiny models, CPU).

    PYTHONPATH=. python benchmarks/architectures.py [model_type ...]

For every tiny random-init model of ``tests/tiny_models.py`` and of ``tests/vlm_classes`` (or the
ones named), the three generations of :mod:`tests.vlm_classes.checks` (batch 2, 4 new tokens:
uncompiled, and rotatek ``inner="eager"`` at ``r = d`` and ``r = d/4``), then one markdown row:
sites rewritten / left exact (with the reasons), exact at ``r = d``, span = image tokens, Key-cache
bytes at ``r = d/4`` over the uncompiled cache's, the library's WARNING where the span is not the
image tokens (at ``r = d/4``: what it said, or "none" for a silent gap), seconds, and the known gap
if any. Totals at the end; the model types listed as not buildable follow with their reasons.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Callable

import torch
import transformers

from tests.tiny_models import TINY_MODELS
from tests.vlm_classes import ALL, KNOWN_GAPS, NOT_BUILDABLE, checks
from tests.vlm_classes.common import class_name, not_in_transformers


def _cell(text: str) -> str:
    """``text`` as one markdown table cell (a ``|`` in it, as in ``|Δlogit|``, would split it)."""
    return text.replace("|", "\\|")


def _verdict(check: Callable[[], None]) -> str:
    try:
        check()
    except AssertionError as error:
        return f"no ({str(error).splitlines()[0][:80]})"
    except Exception as error:  # noqa: BLE001 (a report row, not a test)
        return f"error ({type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''})"
    return "yes"


def _without_layer_names(message: str) -> str:
    """A WARNING without its list of layers (``(model.layers.0.self_attn, ...)``), shortened."""
    return re.sub(r" \((?:[\w.]+\.[\w.]+(?:, )?)+\)", "", message)[:160]


def row(entry) -> tuple[str, dict]:
    """A markdown row for ``entry`` and its verdicts (``built``, ``sites``, ``exact``, ``span``)."""
    start = time.perf_counter()
    gaps = "; ".join(f"{check}: {gaps[entry.name]}" for check, gaps in KNOWN_GAPS.items() if entry.name in gaps)
    name = f"| {entry.name} | {class_name(entry.model_class)} "
    try:
        reference = checks.generate(entry, None)
        full = checks.generate(entry, entry.head_dim)
        quarter = checks.generate(entry, max(1, entry.head_dim // 4))
    except Exception as error:  # noqa: BLE001 (a report row, not a test)
        built = "not in this transformers" if not_in_transformers(error) else "error"
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        return name + f"| {built} | {_cell(message)} | - | - | - | - | {time.perf_counter() - start:.1f} | " \
            f"{_cell(gaps or '-')} |", dict(built=False)
    prefill = [r for r in full.reports if r.phase == "prefill"]
    rewritten = len(prefill[0].rewritten) if prefill else 0
    skipped = [item for r in full.reports for item in r.skipped]
    reasons = sorted({reason for _, reason in skipped})
    verdicts = dict(built=True,
                    sites=_verdict(lambda: checks.check_sites(entry, full)),
                    exact=_verdict(lambda: checks.check_exact(reference, full)),
                    span=_verdict(lambda: checks.check_span(entry, reference, quarter)))
    try:
        ratio = f"{checks.key_bytes_ratio(reference, quarter):.3f}"
    except Exception as error:  # noqa: BLE001
        ratio = f"error ({type(error).__name__})"
    sites = (f"{rewritten} / {len({layer for layer, _ in skipped})} ({'; '.join(reasons) or '-'}); "
             f"sites check {verdicts['sites']}")
    warned = "-" if verdicts["span"] == "yes" else (_without_layer_names(quarter.warnings[0]) if quarter.warnings
                                                    else "none")
    verdicts["silent"] = warned == "none"
    seconds = time.perf_counter() - start
    return (name + f"| yes | {_cell(sites)} | {_cell(verdicts['exact'])} | {_cell(verdicts['span'])} | {ratio} | "
            f"{_cell(warned)} | {seconds:.1f} | {_cell(gaps or '-')} |"), verdicts


def main(names: list[str]) -> None:
    entries = [e for e in TINY_MODELS + ALL if not names or e.name in names]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}\n")
    print("| model_type | class | built | sites: rewritten / left exact (reasons) | exact at r = d | "
          "span = image tokens | Key bytes r = d/4 / uncompiled | WARNING (span not the image) | s | known gap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals = dict(classes=0, built=0, sites=0, exact=0, span=0, silent=0)
    for entry in entries:
        text, verdicts = row(entry)
        print(text, flush=True)
        totals["classes"] += 1
        totals["built"] += verdicts["built"]
        for check in ("sites", "exact", "span"):
            totals[check] += verdicts.get(check) == "yes"
        totals["silent"] += verdicts.get("silent", False)
    print(f"\nTotals: {totals['classes']} classes, {totals['built']} built and generated, "
          f"sites right {totals['sites']}, exact at r = d {totals['exact']}, span = image tokens and "
          f"fewer Key bytes {totals['span']}; span not the image tokens with no WARNING {totals['silent']}.")
    if not names and NOT_BUILDABLE:
        print(f"\nNot buildable ({len(NOT_BUILDABLE)}):\n")
        for model_type, reason in sorted(NOT_BUILDABLE.items()):
            print(f"- {model_type}: {reason}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and leaves the other core free
    main(sys.argv[1:])
