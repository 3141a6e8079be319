"""The three generations of a tiny model and the checks on them (shared by the tests and the report).

Per model, batch 2 (left padding, the image at a different position in each row), greedy, 4 new
tokens: one uncompiled generation and two under ``RotateKBackend(RotateKConfig(key_channels=K),
inner="eager")`` (no Inductor: a compile is a Dynamo trace), at ``K = head_dim`` and
``K = head_dim // 4``. The checks:

``sites``
    the prefill graph and every decode graph rewrite exactly the decoder's full-attention
    self-attention layers (``TinyModel.full_attention`` of them; the full-attention indices of
    ``layer_types`` where the text config has them); every other attention (vision tower,
    cross-attention, sliding window) is reported left exact with a reason, vision-tower
    attention with the "no KV-cache append" reason;
``exact``
    at ``K = head_dim``: identical tokens and ``max |Δlogit| <= 1e-4`` (fp32) against uncompiled;
``span``
    at ``K = head_dim // 4``: every rewritten layer's compressed span (``span_mask.sum(-1)``) is
    exactly each row's image tokens (text-only prompts: the prompt minus its last ``query_window``
    tokens), and the cache holds fewer Key bytes than the uncompiled one.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Optional

import torch

from rotatek_compile import RotateKBackend, RotateKConfig, cache_bytes
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.state import attached
from tests.tiny_models import IMAGE, TinyModel

BATCH = 2
NEW_TOKENS = 4
ATOL = 1e-4  # fp32
QUERY_WINDOW = RotateKConfig().query_window


@dataclasses.dataclass(repr=False)
class Run:
    """One generation: its outputs, the backend's reports (compiled runs) and what it cost."""

    logits: torch.Tensor  # [NEW_TOKENS, B, V]
    sequences: torch.Tensor  # [B, S + NEW_TOKENS]
    cache: Any
    inputs: dict
    reports: list  # GraphReport, compiled runs only
    text_config: Any
    build_seconds: float
    generate_seconds: float
    warnings: list[str] = dataclasses.field(default_factory=list)  # the library's WARNINGs (compiled runs)

    def __repr__(self) -> str:
        return f"Run(batch={self.sequences.shape[0]}, reports={self.reports})"


def generate(entry: TinyModel, key_channels: Optional[int]) -> Run:
    """Build ``entry`` and generate; compiled with the rotatek backend unless ``key_channels`` is None."""
    start = time.perf_counter()
    model = entry.build()
    inputs = entry.inputs(model, BATCH)
    built = time.perf_counter()
    reports = []
    torch._dynamo.reset()
    warnings = _WarningRecords()
    logging.getLogger("rotatek_compile").addHandler(warnings)
    try:
        if key_channels is not None:
            backend = RotateKBackend(RotateKConfig(key_channels=key_channels), inner="eager")
            reports = backend.reports
            model.compile(backend=backend)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        torch._dynamo.reset()
        logging.getLogger("rotatek_compile").removeHandler(warnings)
    done = time.perf_counter()
    cache = output_cache(out)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Run(torch.stack(out.logits), out.sequences, cache, inputs, reports, text_config,
               built - start, done - built, warnings.messages)


class _WarningRecords(logging.Handler):
    """Keeps the messages of WARNING and above."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def decoder_cache(cache: Any) -> Any:
    """The self-attention cache (``EncoderDecoderCache`` keeps it beside the cross-attention one)."""
    return getattr(cache, "self_attention_cache", cache)


def _short(layer: str) -> str:
    """Prefill graphs may start inside the inner model, decode graphs at the top: drop leading
    ``model.`` / ``language_model.`` parts so both name a layer alike."""
    return re.sub(r"^((model|language_model|text_model|decoder)\.)+", "", layer)


def _layer_index(layer: str) -> Optional[int]:
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", layer)
    return int(found.group(1)) if found else None


_VISION = re.compile(r"vision|visual|image|vit|patch", re.IGNORECASE)
_NO_CACHE_REASON = "no KV-cache append"


def check_sites(entry: TinyModel, run: Run) -> None:
    """Raise ``AssertionError`` unless exactly the decoder's full-attention layers were rewritten."""
    by_phase = {phase: [r for r in run.reports if r.phase == phase] for phase in ("prefill", "decode", "other")}
    assert len(by_phase["prefill"]) == 1, f"expected one prefill graph with rewritten sites: {run.reports}"
    assert by_phase["decode"], f"no decode graph was rewritten: {run.reports}"
    layer_types = getattr(run.text_config, "layer_types", None)
    prefill = None
    for report in by_phase["prefill"] + by_phase["decode"]:
        rewritten = [_short(layer) for layer in report.rewritten]
        assert len(rewritten) == len(set(rewritten)) == entry.full_attention, (
            f"{report.phase}: {len(rewritten)} sites rewritten, expected {entry.full_attention}: {report}")
        for layer in rewritten:
            index = _layer_index(layer)
            assert index is not None and not _VISION.search(layer), f"rewritten outside the decoder: {layer}"
            if layer_types is not None and index < len(layer_types):
                assert layer_types[index] == "full_attention", f"{layer} is a {layer_types[index]} layer"
        skipped = {_short(layer): reason for layer, reason in report.skipped}
        for expected in entry.skipped:
            hits = [layer for layer in skipped if expected in layer]
            assert hits, f"{expected} not reported left exact: {report}"
            assert not any(expected in layer for layer in rewritten), report
        prefill = prefill if prefill is not None else set(rewritten)
        assert set(rewritten) == prefill, f"decode rewrites other layers than prefill: {run.reports}"
    for report in run.reports:  # everything else is left exact, with a reason
        for layer, reason in report.skipped:
            assert reason, f"{layer} left exact without a reason"
            if _VISION.search(layer) and not re.search(r"(^|\.)(language_model|text_model)\.", layer):
                assert _NO_CACHE_REASON in reason, f"vision-tower attention {layer}: reason {reason!r}"


def check_exact(reference: Run, compiled: Run) -> None:
    """Raise ``AssertionError`` unless the compiled run at ``K = head_dim`` matches the reference."""
    assert compiled.logits.shape == reference.logits.shape, (compiled.logits.shape, reference.logits.shape)
    errors = (compiled.logits - reference.logits).abs().amax(dim=(1, 2))  # [NEW_TOKENS]
    assert torch.isfinite(compiled.logits).all(), f"non-finite logits; max |Δlogit| per step {errors.tolist()}"
    assert errors.max() <= ATOL, f"max |Δlogit| per step (prefill first): {errors.tolist()}"
    assert torch.equal(compiled.sequences, reference.sequences), "greedy tokens differ"


def expected_span(entry: TinyModel, inputs: dict) -> torch.Tensor:
    """``[B]`` tokens each row's span must hold: its image tokens, or its prompt minus the window;
    either way minus the row's first real token when the span holds it (an attention sink, kept
    exact: PaliGemma's prompt starts with the image)."""
    if entry.has_image:
        ids = inputs.get("input_ids")
        assert ids is not None, "the check finds no prompt to count a span in (no input_ids)"
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        first = (mask.cumsum(-1) == 1) & mask.bool()  # [B, S]: each row's first real token
        return (ids == IMAGE).sum(-1) - ((ids == IMAGE) & first).sum(-1)
    mask = inputs.get("attention_mask")
    assert mask is not None, "the check finds no prompt to count a span in (no attention_mask)"
    return (mask.sum(-1) - QUERY_WINDOW - 1).clamp(min=0)


def span_tokens(run: Run) -> list[torch.Tensor]:
    """``[B]`` span tokens per row of every compressed layer of ``run``'s cache."""
    states = [attached(getattr(layer, "keys", None)) for layer in decoder_cache(run.cache).layers]
    return [state.span_mask.sum(-1) for state in states if state is not None]


def key_bytes_ratio(reference: Run, compiled: Run) -> float:
    return cache_bytes(decoder_cache(compiled.cache)).keys / cache_bytes(decoder_cache(reference.cache)).keys


def check_span(entry: TinyModel, reference: Run, compiled: Run) -> None:
    """Raise ``AssertionError`` unless the compressed span is each row's image tokens (``K = d/4``)
    in every rewritten layer, and the Key cache shrank."""
    assert torch.isfinite(compiled.logits).all()
    expected = expected_span(entry, compiled.inputs)
    assert (expected > 0).all(), f"the prompt has no span to compress: {expected.tolist()}"
    spans = span_tokens(compiled)
    assert len(spans) == entry.full_attention, f"{len(spans)} compressed layers, expected {entry.full_attention}"
    for i, span in enumerate(spans):
        assert torch.equal(span.cpu(), expected), (
            f"compressed layer {i}: span {span.tolist()}, expected {expected.tolist()}")
    ratio = key_bytes_ratio(reference, compiled)
    assert ratio < 1, f"Key cache bytes compressed / uncompressed = {ratio:.3f}"
