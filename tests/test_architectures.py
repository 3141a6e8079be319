"""Every tiny architecture of ``tests/tiny_models.py`` under ``generate()`` with the rotatek backend.

Per model (``inner="eager"``: no Inductor, so one compile is a Dynamo trace only):

(a) sites: the prefill and decode graphs rewrite exactly the decoder self-attention layers with
    full attention; sliding-window, cross-attention and vision-tower attention are reported
    skipped with a reason;
(b) at ``key_channels == head_dim``: logits of the prefill and of 16 greedy decode steps match
    the uncompiled model (fp32, ``atol 1e-4``) and the greedy tokens are identical;
(c) at ``key_channels == head_dim // 4``: generation runs, logits are finite, every rewritten
    layer keeps ``K̃ [B, H, Sv, r]`` for the span (``Sv`` = the image tokens, or the prompt's head
    for text-only prompts) — exactly ``r/d`` of the span's full Keys — and the cache's Key bytes
    are below the uncompiled cache's;
(d) batch 2, left padding, image at a different position in each row: matches at ``r = d``;
(e) no recompilation after the first decode step (Dynamo's ``unique_graphs`` counter after
    decode step 3 equals the one after step 16);
(f) ``attn_implementation="eager"`` (matmul → scale → mask → softmax → matmul) on a few models
    that cover 1-D RoPE, M-RoPE, QK-norm + sliding window, and a prefix-LM mask: (a) and (b).

Known gaps are marked ``xfail(strict=True)`` in :data:`XFAIL`, with the cause.

Each generation runs once per (model, configuration) and is shared by the tests that read it
(:func:`_run`); a failure is stored and re-raised by every test that needs that run.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rotatek_compile import RotateKBackend, RotateKConfig, cache_bytes
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.state import attached
from rotatek_compile.tiers import SINK_LIMIT
from tests.tiny_models import BY_NAME, IMAGE, TINY_MODELS, TinyModel, image_token_counts

STEPS = 16  # greedy decode steps after the prefill
ATOL = 1e-4  # fp32
QUERY_WINDOW = RotateKConfig().query_window


def _xfail(reason: str):
    return pytest.mark.xfail(reason=reason, strict=True)


# Known gaps: test name → model name → xfail reason (none at present)
XFAIL: dict[str, dict[str, str]] = {}


def _models(test: str, names: Optional[tuple[str, ...]] = None):
    """``TINY_MODELS`` (or ``names``) as parameters, the known gaps of ``test`` marked xfail (strict);
    one worker runs a model's tests (``--dist loadgroup``), so that they share its runs."""
    gaps = XFAIL.get(test, {})
    return [pytest.param(m.name, id=m.name, marks=([_xfail(gaps[m.name])] if m.name in gaps else [])
                         + [pytest.mark.xdist_group(f"architecture {m.name}")])
            for m in TINY_MODELS if names is None or m.name in names]


# ---------------------------------------------------------------------------------------------
# One generation per (model, mode, batch, r, attention), shared by the tests


class _GraphCounter(StoppingCriteria):
    """Records Dynamo's ``unique_graphs`` after the prefill (index 0) and each decode step."""

    def __init__(self):
        self.unique_graphs: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.unique_graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclasses.dataclass(repr=False)
class Run:
    logits: torch.Tensor  # [1 + STEPS, B, V]
    sequences: torch.Tensor  # [B, S + 1 + STEPS]
    cache: object
    inputs: dict
    reports: list  # GraphReport, compiled runs only
    unique_graphs: list[int]  # after prefill, after decode step 1, 2, ...

    def __repr__(self) -> str:
        return f"Run(batch={self.sequences.shape[0]}, reports={self.reports})"


_RUNS: dict[tuple, object] = {}


def _run(name: str, compiled: bool, batch: int = 1, key_channels: Optional[int] = None,
         attn_implementation: str = "sdpa") -> Run:
    key = (name, compiled, batch, key_channels, attn_implementation)
    if key not in _RUNS:
        try:
            _RUNS[key] = _generate(BY_NAME[name], compiled, batch, key_channels, attn_implementation)
        except Exception as error:  # stored: every test that needs this run reports it
            _RUNS[key] = error
    result = _RUNS[key]
    if isinstance(result, Exception):
        raise result
    return result


def _generate(entry: TinyModel, compiled: bool, batch: int, key_channels: Optional[int],
              attn_implementation: str) -> Run:
    model = entry.build(attn_implementation)
    inputs = entry.inputs(model, batch)
    counter = _GraphCounter()
    reports = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        if compiled:
            backend = RotateKBackend(RotateKConfig(key_channels=key_channels), inner="eager")
            reports = backend.reports
            model.compile(backend=backend)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=1 + STEPS, output_logits=True,
                                 return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([counter]))
    finally:
        torch._dynamo.reset()
    return Run(torch.stack(out.logits), out.sequences, output_cache(out), inputs, reports,
               counter.unique_graphs)


def _exact(name: str, batch: int = 1, attn_implementation: str = "sdpa") -> tuple[Run, Run]:
    head_dim = BY_NAME[name].head_dim
    return (_run(name, False, batch, attn_implementation=attn_implementation),
            _run(name, True, batch, head_dim, attn_implementation))


def _assert_matches(reference: Run, compiled: Run) -> None:
    assert compiled.logits.shape == reference.logits.shape
    errors = (compiled.logits - reference.logits).abs().amax(dim=(1, 2))  # [1 + STEPS]
    assert torch.isfinite(compiled.logits).all(), f"non-finite logits; error per step {errors.tolist()}"
    assert errors.max() <= ATOL, f"max |Δlogit| per step (prefill first): {errors.tolist()}"
    assert torch.equal(compiled.sequences, reference.sequences)


def _short(layer: str) -> str:
    """Prefill graphs start inside the inner model, decode graphs at the top: drop a leading 'model.'."""
    return layer[len("model."):] if layer.startswith("model.") else layer


# ---------------------------------------------------------------------------------------------
# (a) sites


@pytest.mark.parametrize("name", _models("test_sites"))
def test_sites(name):
    entry = BY_NAME[name]
    run = _run(name, True, 1, entry.head_dim)
    by_phase = {phase: [r for r in run.reports if r.phase == phase] for phase in ("prefill", "decode", "other")}
    assert len(by_phase["prefill"]) == 1, run.reports
    # the cache length is a symbol from the first step; a sliding layer's own cache (Gemma 3) adds one
    sliding = any("sliding-window" in reason for report in run.reports for _, reason in report.skipped)
    assert len(by_phase["decode"]) == (2 if sliding else 1), run.reports
    for report in by_phase["prefill"] + by_phase["decode"]:
        rewritten = [_short(layer) for layer in report.rewritten]
        assert len(rewritten) == len(set(rewritten)) == entry.full_attention, report
        assert all(re.search(r"(^|\.)layers\.\d+\.", layer) and "vision" not in layer for layer in rewritten), report
        skipped = {_short(layer): reason for layer, reason in report.skipped}
        for expected in entry.skipped:
            hits = [layer for layer in skipped if expected in layer]
            assert hits and all(skipped[h] for h in hits), f"{expected} not reported skipped: {report}"
            assert not any(expected in layer for layer in rewritten), report
    prefill = {_short(layer) for layer in by_phase["prefill"][0].rewritten}
    for report in by_phase["decode"]:
        assert {_short(layer) for layer in report.rewritten} == prefill
    # every attention outside the decoder's self-attention is left exact, with a reason
    for report in run.reports:
        assert all(reason for _, reason in report.skipped)


# ---------------------------------------------------------------------------------------------
# (b) exact at r = d


@pytest.mark.parametrize("name", _models("test_full_rank_is_exact"))
def test_full_rank_is_exact(name):
    _assert_matches(*_exact(name))


# ---------------------------------------------------------------------------------------------
# (c) r = d / 4: runs, finite, K̃ bytes = r/d of the span's Keys, fewer Key bytes than baseline


@pytest.mark.parametrize("name", _models("test_quarter_rank_bytes"))
def test_quarter_rank_bytes(name):
    entry = BY_NAME[name]
    d = entry.head_dim
    r = d // 4
    run = _run(name, True, 1, r)
    baseline = _run(name, False, 1)
    assert torch.isfinite(run.logits).all()
    assert run.sequences.shape == baseline.sequences.shape

    if entry.has_image:
        span_tokens = int(image_token_counts(run.inputs).max())
    else:
        span_tokens = int(run.inputs["attention_mask"].sum(-1).max()) - QUERY_WINDOW
    assert span_tokens > 0
    compressed = 0
    for layer in run.cache.layers:
        state = attached(layer.keys)
        if state is None:
            continue
        compressed += 1
        k_tilde = state.span_key_parts[0]  # [B, H, Sv, r]
        batch, heads, length, _ = layer.keys.shape
        sinks = span_tokens - k_tilde.shape[2]  # span tokens kept exact (rotatek_compile.tiers)
        assert (1 if not entry.has_image else 0) <= sinks <= SINK_LIMIT
        assert (state.split.span, state.split.exact) == (span_tokens, sinks)  # batch 1
        assert tuple(k_tilde.shape) == (batch, heads, span_tokens - sinks, r), (
            f"K̃ {tuple(k_tilde.shape)}: expected {span_tokens - sinks} span tokens at r = {r}")
        full = batch * heads * (span_tokens - sinks) * d * k_tilde.element_size()  # those tokens' baseline Keys
        assert k_tilde.numel() * k_tilde.element_size() * d == full * r
    assert compressed == entry.full_attention
    assert cache_bytes(run.cache).keys < cache_bytes(baseline.cache).keys


# ---------------------------------------------------------------------------------------------
# (d) batch 2, left padding, different image positions


@pytest.mark.parametrize("name", _models("test_batch2_left_padding_is_exact"))
def test_batch2_left_padding_is_exact(name):
    reference, compiled = _exact(name, batch=2)
    mask = compiled.inputs["attention_mask"]
    assert (mask[:, 0] == 0).any(), "the batch must be left-padded"
    if BY_NAME[name].has_image:
        first = [int(row.nonzero()[0]) for row in compiled.inputs["input_ids"] == IMAGE]
        assert first[0] != first[1], "the image must sit at a different position in each row"
    _assert_matches(reference, compiled)


# ---------------------------------------------------------------------------------------------
# (e) no recompilation per decode step


@pytest.mark.parametrize("name", _models("test_no_recompile_after_two_steps"))
def test_no_recompile_after_two_steps(name):
    run = _run(name, True, 1, BY_NAME[name].head_dim)
    graphs = run.unique_graphs  # [after prefill, after decode step 1, ..., after step 16]
    assert len(graphs) == 1 + STEPS
    assert graphs[3] == graphs[STEPS], f"unique graphs after prefill and each decode step: {graphs}"


# ---------------------------------------------------------------------------------------------
# (f) eager attention


EAGER_MODELS = ("llama", "qwen2_vl", "gemma3", "paligemma")


@pytest.mark.parametrize("name", _models("test_eager_attention_is_exact", EAGER_MODELS))
def test_eager_attention_is_exact(name):
    reference, compiled = _exact(name, attn_implementation="eager")
    entry = BY_NAME[name]
    for report in compiled.reports:
        if report.phase in ("prefill", "decode"):
            assert len(report.rewritten) == entry.full_attention, report
    sliding = any("sliding-window" in reason for report in compiled.reports for _, reason in report.skipped)
    assert [r.phase for r in compiled.reports].count("decode") == (2 if sliding else 1)
    _assert_matches(reference, compiled)
