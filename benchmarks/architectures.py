"""Per-architecture report: sites rewritten/left exact, span size, and Key bytes (tiny models, CPU).

    PYTHONPATH=. python benchmarks/architectures.py

For every tiny random-init model of ``tests/tiny_models.py`` (batch 1, one image): generate 4
tokens exact and compiled (``key_channels = head_dim // 4``, ``inner="eager"``), then print a
markdown row from the backend's reports and the two caches.
"""

from __future__ import annotations

import torch

import rotatek_compile
from rotatek_compile import RotateKBackend, RotateKConfig
from rotatek_compile.state import attached
from tests.tiny_models import TINY_MODELS


def row(entry) -> str:
    torch._dynamo.reset()
    model = entry.build()
    inputs = entry.inputs(model, 1)
    rank = max(1, entry.head_dim // 4)
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        exact = model.generate(**inputs, **settings)
        backend = RotateKBackend(RotateKConfig(key_channels=rank), inner="eager")
        model.compile(backend=backend)
        compressed = model.generate(**inputs, **settings)
    prefill = next(report for report in backend.reports if report.phase == "prefill")
    reasons = sorted({reason for report in backend.reports for _, reason in report.skipped})
    states = [s for s in (attached(layer.keys) for layer in compressed.past_key_values.layers) if s]
    span = states[0].span_key_parts[0]  # K̃ [B, H, Sv, r]
    full_width = span.shape[0] * span.shape[1] * span.shape[2] * states[0].head_dim * span.element_size()
    before = rotatek_compile.cache_bytes(exact.past_key_values)
    after = rotatek_compile.cache_bytes(compressed.past_key_values)
    return (f"| {entry.name} | {len(prefill.rewritten)} | {'; '.join(reasons) or '-'} | {span.shape[2]} | "
            f"{rank}/{entry.head_dim} | {states[0].span_key_bytes / full_width:.3f} | {after.keys / before.keys:.3f} |")


def main() -> None:
    print("| arch | decoder sites rewritten | left exact (reasons) | span tokens | r/d | "
          "K̃ bytes / span Key bytes | Key cache after/before |")
    print("|---|---|---|---|---|---|---|")
    for entry in TINY_MODELS:
        print(row(entry), flush=True)


if __name__ == "__main__":
    main()
