"""Fidelity of the compressed KV cache on real weights, through the compiled model (protocol: ``docs/fidelity.md``).

The tiered cache (``kv_budget``) vs token-only at the budgets 0.25 / 0.4 / 0.5 / 0.63 of the
span's KV bytes, and RotateK vs ThinK vs SparK-style vs K-only PCA (token keep 1) at equal bytes,
all in *true* bytes (every stored tensor: per-token parts, the per-head basis or indices, masks,
padding slots, and the attention sinks every method keeps exact), on SmolLM2-135M-Instruct and
Gemma-3-270M loaded offline from the GGUF files of their PyPI packages. Prompts are
``[instruction | document | question]`` built by :mod:`fidelity_prompts` (five document kinds in
turn, 1–4k tokens); with no image the backend compresses the prompt minus its last
``query_window`` (32) tokens, i.e. the instruction and the document, and the question stays exact.

Prompts with an even index are *tuning* prompts, odd ones *held out*: anything chosen from results
(the fixed tiered split reported next to the adaptive one) is chosen on the tuning prompts, and
every table reports the held-out ones (:mod:`fidelity_report`).

Per prompt, against the uncompressed model (plain eager Hugging Face, its own ``DynamicCache``):

- **KL**: next-token ``KL(p_exact ‖ p_compressed)`` in nats, mean over the exact model's own
  greedy continuation (``--steps`` tokens), teacher-forced. Position 0 is predicted by the (exact)
  prefill, the others by the compressed cache: the fed tokens are appended to it as one chunk,
  which attends exactly as one-token decode steps would (the op is causal inside a chunk;
  ``tests/test_generate.py::test_chunk_on_compressed_cache_equals_token_by_token``).
- **greedy agreement**: on the same run, ``agree`` is the fraction of the compressed model's
  greedy choices equal to the exact model's, ``prefix`` the fraction before the first mismatch
  (= how much of a free-running greedy generation is identical).
- **PPL**: perplexity of the held-out continuation (the asked document entries, verbatim),
  teacher-forced, compressed / exact (geometric mean over prompts).

Each prompt runs alone, its two continuations as the two rows of one batch (the tiered cache
chooses its split per prompt). Every cell goes through ``torch.compile(model.forward, backend=...)``:
the backend is ``SweepBackend``, a :class:`rotatek_compile.RotateKBackend` whose compiled graphs
serve every cell. The prefill graph's outputs do not depend on the cell, so they are computed once
per prompt and reused; the per-cell compression (``compress_layer``), the stand-ins handed to HF
and the chunk's attention are the product's own code. ``--quick`` checks that this gives the same
logits as a fresh ``torch.compile(..., backend=RotateKBackend(config))``.

Bytes: every compressed layer of every cell is measured tensor by tensor (and by the storage it
owns, so a view into a larger buffer would show), checked against the product's accounting and,
for the non-tiered methods, against the analytic size of what the method keeps
(:func:`measure_cache`); tiered cells are checked to stay within their budget.

Usage::

    python benchmarks/fidelity.py --quick      # CI: SmolLM2, 2 prompts, asserts (about 3 min)
    python benchmarks/fidelity.py              # 24 prompts, every cell → docs/fidelity.{md,json}, docs/fidelity_kl.png
    python benchmarks/fidelity.py --reduced    # 24 prompts of 1–4k tokens, fewer cells (about 1 h on 2 CPU cores)
    python benchmarks/fidelity.py --report-only  # rebuild the page from docs/fidelity_<model>.json

One thread per process (``--threads``): on the shared 2-core machine 1 thread ran a SmolLM2
prefill 4× faster than 2 (OpenMP spin-waiting under load); the two models run in two processes
(``--jobs 2``). A running sweep rewrites ``<out>/fidelity_<model>.partial.json`` after each prompt; a run started
again with the same arguments resumes from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from rotatek_compile import pretrained
from rotatek_compile.hf_compat import cache_kwargs, output_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_report  # noqa: E402
from fidelity_prompts import make_prompts  # noqa: E402

WINDOW = 32  # query_window: the exact tail of the prompt
ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2", "gemma3")
BUDGETS = (0.25, 0.4, 0.5, 0.63)  # fractions of the span's KV bytes, true bytes
RATIOS = (1 / 8, 1 / 4, 1 / 2)  # r/d of the channel methods (token keep 1)
FIXED_ROTATED = (0.125, 0.25, 0.375, 0.5, 0.625)  # fixed tiered splits (rotated fraction t), where they fit
FULL_LENGTHS = (1024, 2048, 3072, 4096) * 6  # 24 prompts, five document kinds in turn
REDUCED_LENGTHS = FULL_LENGTHS  # the same 24 prompts, fewer cells
QUICK_LENGTHS = (1024, 1024)
STEPS = 64


# --- models ---------------------------------------------------------------------------------------


# the benchmark's model names → rotatek_compile.pretrained's
PRETRAINED = {"smollm2": pretrained.SMOLLM2, "gemma3": pretrained.GEMMA3_270M}


def load_model(model: str):
    """``(model, tokenizer)`` in float32, eval mode, from the package's GGUF (offline)."""
    import logging

    from transformers.utils import logging as hf_logging

    if model not in PRETRAINED:
        raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return pretrained.load(PRETRAINED[model], dtype=torch.float32)


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


# --- sweep cells ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the sweep: a channel method, ``r/d`` (or explicit ``r``) and a token keep."""

    label: str  # rotatek | rotatek-konly | think | spark | token-only | exact | tiered
    method: str
    ratio: float  # r/d (1 = all channels)
    token_keep: float
    query_aware: bool | str = "auto"  # the product's default
    channels: Optional[int] = None  # explicit r (overrides ratio)
    kv_budget: Optional[float] = None  # tiered cache under this byte budget
    rotated: Optional[tuple[float, ...]] = None  # tiered: the rotated fractions tried (None: the product's)

    @property
    def name(self) -> str:
        r = f"r={self.channels}" if self.channels else f"r/d={_frac(self.ratio)}"
        if self.kv_budget is not None:
            fixed = "" if self.rotated is None else " t=" + ",".join(f"{t:g}" for t in self.rotated)
            return f"{self.label} {r} budget={self.kv_budget:g}{fixed}"
        return f"{self.label} {r} tk={self.token_keep:g}"

    def config(self):
        from rotatek_compile import RotateKConfig

        channels = dict(key_channels=self.channels) if self.channels else dict(key_keep_ratio=self.ratio)
        return RotateKConfig(**channels, method=self.method, token_keep=self.token_keep, query_aware=self.query_aware,
                             span="prompt", query_window=WINDOW, kv_budget=self.kv_budget)

    def nominal(self, head_dim: int) -> float:
        """Span KV bytes relative to uncompressed: ``token_keep·(1 + r/d)/2``."""
        return self.token_keep * (1 + self.rank(head_dim) / head_dim) / 2

    def rank(self, head_dim: int) -> int:
        return self.config().channels_for(head_dim)


def _frac(x: float) -> str:
    for den in (1, 2, 3, 4, 8):
        if abs(x * den - round(x * den)) < 1e-9:
            return f"{round(x * den)}/{den}" if den > 1 else f"{round(x)}"
    return f"{x:.3g}"


def full_cells(ratios: tuple[float, ...] = RATIOS, fixed: tuple[float, ...] = FIXED_ROTATED) -> list[Cell]:
    """The sweep: the sanity row; token-only and the tiered cache (adaptive, and each fixed split
    that can fit) at every budget; RotateK, ThinK, SparK-style and K-only PCA at each r/d."""
    cells = [Cell("exact", "rotatek", 1.0, 1.0)]
    cells += [Cell("token-only", "think", 1.0, budget) for budget in BUDGETS]
    cells += [Cell("tiered", "rotatek", 0.5, 1.0, kv_budget=budget) for budget in BUDGETS]
    # a rotated token costs 3/4 of an exact one at r = d/2: t is feasible below (budget - basis) / 0.75
    cells += [Cell("tiered", "rotatek", 0.5, 1.0, kv_budget=budget, rotated=(t,))
              for budget in BUDGETS for t in fixed if 0.75 * t < budget - 0.02]
    for method in ("rotatek", "think", "spark"):
        cells += [Cell(method, method, ratio, 1.0) for ratio in ratios]
    cells += [Cell("rotatek-konly", "rotatek", ratio, 1.0, query_aware=False) for ratio in ratios]
    return cells


def reduced_cells() -> list[Cell]:
    """What the 2 shared CPU cores allow: r/d ∈ {1/4, 1/2}, fixed splits t ∈ {0.25, 0.5}; and
    SparK-style at r/d = 1/8, its one point below RotateK's bytes at r/d = 1/4 (its int16 index
    per kept channel makes it store more than RotateK at the same r), without which the two
    cannot be compared there at equal bytes."""
    return full_cells(ratios=(1 / 4, 1 / 2), fixed=(0.25, 0.5)) + [Cell("spark", "spark", 1 / 8, 1.0)]


def quick_cells() -> list[Cell]:
    return [
        Cell("exact", "rotatek", 1.0, 1.0),
        Cell("rotatek", "rotatek", 1 / 4, 1.0),
        Cell("rotatek-konly", "rotatek", 1 / 4, 1.0, query_aware=False),
        Cell("think", "think", 1 / 4, 1.0),
        Cell("spark", "spark", 1 / 4, 1.0),
        Cell("token-only", "think", 1.0, 0.5),
        Cell("tiered", "rotatek", 0.5, 1.0, kv_budget=0.5),
        Cell("tiered", "rotatek", 0.5, 1.0, kv_budget=0.25, rotated=(0.25,)),
    ]


# --- one compiled model serving every cell --------------------------------------------------------


class _MemoPrefill:
    """The compiled prefill graph, run once per ``memo_key``: its outputs, and what each site hands
    the compression inside it (``PrefillRun.take``), do not depend on the cell. Later cells of the
    key get the outputs back and the recorded sites fed to their own run."""

    def __init__(self, compiled, owner: "SweepBackend"):
        self.compiled, self.owner = compiled, owner
        self.key: Any = None
        self.outputs: Optional[tuple] = None
        self.sites: list[tuple] = []
        self.shapes: Optional[list] = None

    def __call__(self, *args):
        from rotatek_compile import prefill

        key = self.owner.memo_key
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
        if key is None:
            return self.compiled(*args)
        if self.key != key or self.outputs is None:
            self.drop()
            with prefill.running(_SiteRecorder()) as recorder:
                self.outputs = tuple(self.compiled(*args))
            self.key, self.shapes, self.sites = key, shapes, recorder.sites
        elif shapes != self.shapes:
            raise RuntimeError("fidelity: prefill memo key reused for different inputs")
        run = prefill.current()  # the runner's own run, for this cell's config
        for site in self.sites:
            run.take(*site)
        return list(self.outputs)

    def drop(self) -> None:
        self.outputs, self.key, self.shapes, self.sites = None, None, None, []


class _SiteRecorder:
    """Stands for a ``PrefillRun`` while the prefill graph runs: keeps a copy of each site's inputs."""

    def __init__(self):
        self.sites: list[tuple] = []

    def take(self, site, keys, values, window, mask_row, context) -> None:
        self.sites.append((site, keys.clone(), values.clone(), window.clone(),
                           None if mask_row is None else mask_row.clone(), [t.clone() for t in context]))


def sweep_backend(inner: str = "eager"):
    from rotatek_compile import RotateKBackend, RotateKConfig
    from rotatek_compile.state import attached

    class SweepBackend(RotateKBackend):
        """A :class:`RotateKBackend` whose compiled graphs serve every cell of the sweep.

        ``select(config, memo_key)`` switches the config that the prefill runtime compresses with
        and the decode graph (one per method: each reads its own state layout); the prefill graph's outputs, and
        what it hands the compression, are memoised per ``memo_key``. Relies on the prefill runner's
        ``plan``/``config``/``compiled`` attributes and on ``rotatek_compile.prefill``'s current run.
        """

        def __init__(self):
            super().__init__(RotateKConfig(span="prompt", query_window=WINDOW), inner=inner)
            self.memo_key: Any = None
            self._prefill: list = []

        def select(self, config, memo_key: Any) -> None:
            if config.query_window != WINDOW or config.kernel != self.config.kernel:
                raise ValueError("SweepBackend serves one query_window and kernel")
            if memo_key != self.memo_key:
                for runner in self._prefill:
                    runner.compiled.drop()
            self.config, self.memo_key = config, memo_key
            for runner in self._prefill:
                runner.config = config

        def __call__(self, gm, example_inputs):
            if any(attached(x) is not None for x in example_inputs):  # a decode graph
                chosen, by_op = self.config, {}
                try:
                    for method in ("rotatek", "think", "spark"):  # each reads its own state layout
                        self.config = dataclasses.replace(chosen, method=method)
                        by_op[method] = RotateKBackend.__call__(self, gm, example_inputs)
                finally:
                    self.config = chosen
                return lambda *args: by_op[self.config.method](*args)
            runner = RotateKBackend.__call__(self, gm, example_inputs)
            plan = getattr(runner, "plan", None)
            if plan is not None and plan.phase == "prefill":
                if not (hasattr(runner, "config") and hasattr(runner, "compiled")):
                    raise RuntimeError("fidelity: rotatek's prefill runner changed; update SweepBackend")
                runner.compiled = _MemoPrefill(runner.compiled, self)
                runner.config = self.config
                self._prefill.append(runner)
            return runner

    return SweepBackend()


# --- bytes -----------------------------------------------------------------------------------------


def expected_span_bytes(method: str, batch: int, heads: int, tokens: int, dim: int, value_dim: int,
                        rank: int, element: int) -> dict[str, int]:
    """Bytes a method must keep for a compressed span of ``tokens`` tokens per (row, head).

    RotateK: ``K̃`` ``tokens·r·elt`` plus, per (row, head), ``R`` ``d·r·elt`` and ``δμ`` ``d·elt``.
    ThinK: the kept channels ``tokens·r·elt`` plus their ``r`` int16 indices per (row, head).
    SparK-style: per token ``r`` values, ``r`` int16 indices and one fill value. Values:
    ``tokens·dv·elt``. Keys are listed in the order of ``CompressedLayer.span_key_parts``.
    """
    per_head = batch * heads
    if method == "rotatek":
        keys = {"keys": per_head * tokens * rank * element, "rotation": per_head * dim * rank * element,
                "mean_residual": per_head * dim * element}
    elif method == "think":
        keys = {"keys": per_head * tokens * rank * element, "channels": per_head * rank * 2}
    elif method == "spark":
        keys = {"keys": per_head * tokens * rank * element, "channels": per_head * tokens * rank * 2,
                "fill": per_head * tokens * element}
    else:
        raise ValueError(method)
    return {**keys, "values": per_head * tokens * value_dim * element}


# per method: the parts stored per span token; the rest of the Key parts are per (row, head)
PER_TOKEN = {"rotatek": ("keys",), "think": ("keys",), "spark": ("keys", "channels", "fill")}


def measure_cache(cache, cell: Cell, prompt_length: int) -> dict[str, Any]:
    """The compressed cache's true bytes, measured tensor by tensor, and every check on them.

    Per compressed layer: every tensor the state holds owns exactly its own bytes (no view of a
    larger buffer), and together they are the product's ``stored_bytes``; the span's share
    (everything less the ``query_window`` tail at full width) is ``split.stored_bytes``. Tiered
    cells: that share is within the budget. Other cells: each span tensor has the analytic size
    of what the method must keep (:func:`expected_span_bytes`) for the span tokens that are not
    attention sinks (the sinks, 1 to ``SINK_LIMIT`` per row, sit in the rest segment at full width,
    counted in the span's bytes), and ``span_key_bytes``/``basis_bytes``/``cache_bytes()`` agree.
    The Key stand-in HF holds has no storage of its own. ``ok`` is every check passing.
    """
    from rotatek_compile import cache_bytes, span_split
    from rotatek_compile.state import attached
    from rotatek_compile.tiers import SINK_LIMIT

    reported = cache_bytes(cache)
    split = span_split(cache)
    stored = full = expected_token_keys = expected_basis = 0
    problems: list[str] = []
    layers = 0
    for index, layer in enumerate(cache.layers):
        state = attached(layer.keys)
        if state is None:
            continue
        layers += 1
        batch, heads, _, dim = layer.keys.shape
        value_dim = state.span_values.shape[-1]
        element = state.span_values.element_size()
        tensors = [*state.span_key_parts, state.span_values, state.span_mask, state.keys, state.values, state.mask]
        storage = sum(t.untyped_storage().nbytes() for t in tensors)
        if storage != sum(t.numel() * t.element_size() for t in tensors) or storage != state.stored_bytes:
            problems.append(f"layer {index}: storage {storage} B, tensors {state.stored_bytes} B")
        token = heads * (dim + value_dim) * element
        span_tokens = prompt_length - WINDOW
        stored += storage - batch * WINDOW * token
        full += batch * span_tokens * token
        if state.split is None or state.split.span != batch * span_tokens:
            problems.append(f"layer {index}: split {state.split}, {batch * span_tokens} span tokens expected")
            continue
        if state.split.stored_bytes != storage - batch * WINDOW * token:
            problems.append(f"layer {index}: split.stored_bytes {state.split.stored_bytes} ≠ measured")
        if layer.keys.untyped_storage().nbytes() > element:
            problems.append(f"layer {index}: the Key stand-in holds storage")
        if cell.kv_budget is not None:
            if state.split.stored_bytes > cell.kv_budget * state.split.full_bytes:
                problems.append(f"layer {index}: {state.split.byte_ratio:.4f} of the span's bytes > budget")
            continue
        sinks, odd = divmod(state.split.exact, batch)
        if odd or not 1 <= sinks <= SINK_LIMIT or state.keys.shape[2] != WINDOW + sinks:
            problems.append(f"layer {index}: {state.split.exact} sinks over {batch} rows, rest {state.keys.shape[2]}")
        compressed = span_tokens - sinks
        kept = math.ceil(cell.token_keep * compressed) if cell.token_keep < 1 else compressed
        expected = expected_span_bytes(state.method, batch, heads, kept, dim, value_dim, cell.rank(dim), element)
        for part, tensor in zip(list(expected)[:len(state.span_key_parts)] + ["values"],
                                [*state.span_key_parts, state.span_values]):
            if tensor.numel() * tensor.element_size() != expected[part]:
                problems.append(f"layer {index} {part}: {tensor.numel() * tensor.element_size()} B stored, "
                                f"{expected[part]} B expected")
        per_token = PER_TOKEN[state.method]
        token_keys = sum(expected[k] for k in per_token)
        basis = sum(expected[k] for k in expected if k not in per_token and k != "values")
        expected_token_keys += token_keys
        expected_basis += basis
        if state.span_key_bytes != token_keys or state.basis_bytes != basis:
            problems.append(f"layer {index}: span_key_bytes/basis_bytes {state.span_key_bytes}/{state.basis_bytes} "
                            f"≠ expected {token_keys}/{basis}")
    if cell.kv_budget is None and (reported.span_keys, reported.span_basis) != (expected_token_keys, expected_basis):
        problems.append(f"cache_bytes() span_keys/span_basis {reported.span_keys}/{reported.span_basis} ≠ expected "
                        f"{expected_token_keys}/{expected_basis}")
    if split is not None and split.stored_bytes != stored:
        problems.append(f"span_split().stored_bytes {split.stored_bytes} ≠ measured {stored}")
    return {"ok": not problems, "problems": problems[:8], "layers": layers, "span_bytes": stored,
            "span_bytes_full": full, "span_ratio": stored / max(full, 1), "cache_total": reported.total,
            "exact": split.exact if split else 0, "rotated": split.compressed if split else 0,
            "dropped": split.dropped if split else 0, "span_tokens": split.span if split else 0}


# --- metrics ---------------------------------------------------------------------------------------


class _Reference(dict):
    """What the exact model gives for one stream: per step its probabilities, ``Σ p log p``, argmax."""


def _reference(steps: int, rows: int, vocab: int) -> _Reference:
    return _Reference(probs=torch.empty(rows, steps, vocab), neg_entropy=torch.empty(rows, steps),
                      argmax=torch.empty(rows, steps, dtype=torch.long),
                      logprob=torch.empty(rows, steps))  # of the fed token (held-out stream)


def _record(ref: _Reference, j: int, logprobs: torch.Tensor, target: Optional[torch.Tensor]) -> None:
    probs = logprobs.exp()
    ref["probs"][:, j] = probs
    ref["neg_entropy"][:, j] = (probs * logprobs).sum(-1)
    ref["argmax"][:, j] = logprobs.argmax(-1)
    if target is not None:
        ref["logprob"][:, j] = logprobs.gather(1, target[:, None])[:, 0]


@torch.no_grad()
def baseline_run(model, input_ids: torch.Tensor, heldout: torch.Tensor, steps: int) -> dict:
    """The uncompressed model (plain eager HF, its own ``DynamicCache``) on both streams.

    Row ``2i`` generates ``steps`` tokens greedily from prompt ``i``; row ``2i+1`` is teacher-forced
    on its held-out continuation (the prefill runs once on ``n`` rows, its cache is repeated).
    """
    from transformers import DynamicCache

    from rotatek_compile import cache_bytes

    n = input_ids.shape[0]
    out = model(input_ids=input_ids, **cache_kwargs(DynamicCache(config=model.config)),
                use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    exact_bytes = cache_bytes(cache).total * 2
    cache.batch_repeat_interleave(2)
    step = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(2, 0)  # [2n, V]
    ref = _reference(steps, 2 * n, step.shape[-1])
    feed = torch.empty(2 * n, steps, dtype=torch.long)  # what each row is fed after position j
    feed[1::2] = heldout[:, :steps]
    for j in range(steps):
        if j:
            out = model(input_ids=feed[:, j - 1: j], **cache_kwargs(cache), use_cache=True)
            step = torch.log_softmax(out.logits[:, -1].float(), -1)
        feed[0::2, j] = step[0::2].argmax(-1)
        _record(ref, j, step, feed[:, j])
    return {"feed": feed, "ref": ref, "exact_cache_bytes": exact_bytes}


@torch.no_grad()
def cell_run(compiled, model, backend, cell: Cell, group: int, input_ids: torch.Tensor,
             base: dict, measure: bool = True, keep_logits: bool = False) -> dict:
    """One cell on one prompt group through the compiled model; per-prompt metrics.

    Rows ``2i`` are teacher-forced on the exact model's greedy continuation (KL, greedy agreement,
    prefix), rows ``2i+1`` on the held-out continuation (PPL, KL on held-out text).
    """
    from transformers import DynamicCache

    from rotatek_compile import tiers

    backend.select(cell.config(), memo_key=group)
    rows = input_ids.repeat_interleave(2, 0)  # [2n, S]
    feed, ref = base["feed"], base["ref"]
    steps = feed.shape[1]
    fractions = tiers.ROTATED_FRACTIONS
    try:  # a fixed tiered split: the product's candidates narrowed to the cell's
        tiers.ROTATED_FRACTIONS = cell.rotated or fractions
        out = compiled(input_ids=rows, **cache_kwargs(DynamicCache(config=model.config)), use_cache=True,
                       logits_to_keep=1)
    finally:
        tiers.ROTATED_FRACTIONS = fractions
    cache = output_cache(out)
    bytes_ = measure_cache(cache, cell, input_ids.shape[1]) if measure else None
    # positions 1..steps-1 in one call: the fed tokens appended to the compressed cache as one
    # chunk, which attends exactly as steps-1 one-token decode steps would (teacher forcing)
    chunk = compiled(input_ids=feed[:, : steps - 1], **cache_kwargs(cache), use_cache=True)
    logits = [out.logits[:, -1]] + list(chunk.logits.unbind(1))  # steps × [2n, V]
    kept = (out.logits[:, -1].clone(), chunk.logits.clone()) if keep_logits else None  # verify_against_fresh
    del out, chunk, cache
    kl = torch.empty(rows.shape[0], steps)
    match = torch.empty(rows.shape[0], steps, dtype=torch.bool)
    logprob = torch.empty(rows.shape[0], steps)
    for j in range(steps):
        step = torch.log_softmax(logits[j].float(), -1)  # [2n, V]
        cross = (ref["probs"][:, j] * step).sum(-1)  # Σ p log q (a CPU bmm here lost 5e-5 nats)
        kl[:, j] = ref["neg_entropy"][:, j] - cross
        match[:, j] = step.argmax(-1) == ref["argmax"][:, j]
        logprob[:, j] = step.gather(1, feed[:, j: j + 1])[:, 0]
    del logits
    mism = ~match[0::2]
    n = input_ids.shape[0]
    first = torch.where(mism.any(1), mism.float().argmax(1), torch.full((n,), float(steps)))
    per_prompt = {
        "kl": kl[0::2].mean(1).tolist(),  # teacher-forced on the exact model's greedy continuation
        "kl_max": kl[0::2].max(1).values.tolist(),
        "agree": match[0::2].float().mean(1).tolist(),  # same greedy choice after the same prefix
        "prefix": (first / steps).tolist(),  # free-running generation identical up to here
        "kl_heldout": kl[1::2].mean(1).tolist(),
        "top1_heldout": match[1::2].float().mean(1).tolist(),
        "ppl": (-logprob[1::2].mean(1)).exp().tolist(),
        "ppl_exact": (-ref["logprob"][1::2].mean(1)).exp().tolist(),
    }
    return {"per_prompt": per_prompt, "bytes": bytes_, "kl_all_max": float(kl.max()), "logits": kept}


# --- one model -------------------------------------------------------------------------------------


def run_model(model_name: str, lengths: tuple[int, ...], cells: Optional[list[Cell]], steps: int,
              seed: int = 0, progress_position: int = 0, verify: bool = False,
              inner: str = "eager", partial: Optional[Path] = None) -> dict:
    """The sweep on one model. ``cells=None`` is the full sweep. Returns a JSON-able dict.

    Each prompt runs alone (its two rows: greedy and held-out continuation), so that the tiered
    cache chooses its split for that prompt and every byte count is that prompt's. Prompt ``i`` is
    a tuning prompt for even ``i``, held out for odd ``i``. ``steps``: tokens of both
    continuations. ``partial``: a JSON file rewritten after every prompt (a long run can be read
    before it ends).
    """
    from tqdm import tqdm

    import rotatek_compile  # noqa: F401

    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_model(model_name)
    timings["load_s"] = time.perf_counter() - start
    text = _text_config(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = next(model.parameters()).element_size()
    if cells is None:
        cells = full_cells()
    prompts = make_prompts(tokenizer, list(lengths), seed=seed, continuation=steps, window=WINDOW)

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    backend = sweep_backend(inner)
    compiled = torch.compile(model.forward, backend=backend)
    results = {cell.name: {"cell": dataclasses.asdict(cell), "per_prompt": {}, "bytes": [],
                           "seconds": 0.0} for cell in cells}
    baseline_s = 0.0
    bar = tqdm(total=len(prompts) * (len(cells) + 1), desc=f"{model_name}", position=progress_position,
               dynamic_ncols=True, leave=True, file=sys.stderr)
    verification = None
    exact_bytes = []
    meta = {"model": model_name, "head_dim": head_dim, "element_size": element,
            "layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads,
            "prompts": [{"kind": p.kind, "tokens": len(p.input_ids), "question_tokens": p.question_tokens,
                         "document_tokens": p.document_tokens, "tuning": i % 2 == 0}
                        for i, p in enumerate(prompts)], "steps": steps}
    done = 0
    if partial is not None and partial.exists():  # resume an interrupted run of the same prompts and cells
        saved = json.loads(partial.read_text())
        if saved.get("prompts") == meta["prompts"] and set(saved["cells"]) == set(results):
            results, exact_bytes, done = saved["cells"], saved["exact_bytes"], saved["done"]
            baseline_s = saved["baseline_s"]
            bar.update(done * (len(cells) + 1))
    for index, prompt in enumerate(prompts):
        if index < done:
            continue
        input_ids = torch.tensor([prompt.input_ids])  # [1, S]
        heldout = torch.tensor([prompt.continuation_ids])  # [1, steps]
        bar.set_postfix_str(f"prompt {index} ({len(prompt.input_ids)} tok): exact model")
        t0 = time.perf_counter()
        base = baseline_run(model, input_ids, heldout, steps)
        baseline_s += time.perf_counter() - t0
        exact_bytes.append(base["exact_cache_bytes"])
        bar.update(1)
        for cell in cells:
            bar.set_postfix_str(f"prompt {index}: {cell.name}")
            t0 = time.perf_counter()
            verify_this = verify and index == 0 and cell.label == "tiered" and verification is None
            run = cell_run(compiled, model, backend, cell, index, input_ids, base, keep_logits=verify_this)
            record = results[cell.name]
            record["seconds"] += time.perf_counter() - t0
            for key, values in run["per_prompt"].items():
                record["per_prompt"].setdefault(key, []).extend(values)
            record["bytes"].append(run["bytes"])
            record.setdefault("kl_all_max", 0.0)
            record["kl_all_max"] = max(record["kl_all_max"], run["kl_all_max"])
            if verify_this:
                verification = {"cell": cell.name, "logits": run["logits"], "feed": base["feed"],
                                "input_ids": input_ids}
            bar.update(1)
        del base
        if partial is not None:
            partial.write_text(json.dumps({**meta, "cells": results, "done": index + 1,
                                           "exact_bytes": exact_bytes, "baseline_s": baseline_s}))
    bar.close()
    for runner in backend._prefill:
        runner.compiled.drop()
    if verify and verification is not None:  # a fresh product compile must give the same logits
        verification = verify_against_fresh(model, cells, verification)
    compressed_layers = max((b["layers"] for r in results.values() for b in r["bytes"] if b), default=0)
    for record in results.values():
        record["bytes_ok"] = all(b["ok"] for b in record["bytes"] if b)
        # a prompt where some layer stayed exact (a fixed split that cannot fit) is not a result
        record["feasible"] = [bool(b) and b["layers"] == compressed_layers for b in record["bytes"]]
        record["cache_ratio"] = [b["cache_total"] / e for b, e in zip(record["bytes"], exact_bytes)]
    timings["baseline_s"] = baseline_s
    timings["total_s"] = time.perf_counter() - start
    return {**meta, "compressed_layers": compressed_layers, "cells": results, "timings": timings,
            "verification": verification,
            "backend_reports": [(r.phase, len(r.rewritten), len(r.skipped)) for r in backend.reports]}


@torch.no_grad()
def verify_against_fresh(model, cells, verification) -> dict:
    """Re-run one cell through a fresh ``torch.compile(backend=RotateKBackend(config))``."""
    from transformers import DynamicCache

    from rotatek_compile import RotateKBackend

    cell = next(c for c in cells if c.name == verification["cell"])
    rows = verification["input_ids"].repeat_interleave(2, 0)
    feed = verification["feed"]
    torch._dynamo.reset()
    backend = RotateKBackend(cell.config(), inner="eager")
    fresh = torch.compile(model.forward, backend=backend)
    out = fresh(input_ids=rows, **cache_kwargs(DynamicCache(config=model.config)), use_cache=True,
                logits_to_keep=1)
    chunk = fresh(input_ids=feed[:, :-1], **cache_kwargs(output_cache(out)), use_cache=True)
    swept_last, swept_chunk = verification["logits"]
    diff = max(float((out.logits[:, -1] - swept_last).abs().max()), float((chunk.logits - swept_chunk).abs().max()))
    torch._dynamo.reset()
    return {"cell": cell.name, "max_abs_logit_diff": diff, "reports": len(backend.reports)}


def _jsonable(result: dict) -> dict:
    out = dict(result)
    if out.get("verification"):
        out["verification"] = {k: v for k, v in out["verification"].items()
                               if k not in ("logits", "feed", "input_ids")}
    return out


# --- CLI -------------------------------------------------------------------------------------------


def quick(out_dir: Optional[Path] = None) -> dict:
    """SmolLM2, 2 prompts, 16-token continuations; asserts the sanity row and every bytes check."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run_model("smollm2", QUICK_LENGTHS, quick_cells(), steps=16, verify=True)
    result["wall_s"] = time.perf_counter() - start
    exact = result["cells"][Cell("exact", "rotatek", 1.0, 1.0).name]
    failures = []
    if not exact["kl_all_max"] <= 1e-6:
        failures.append(f"sanity row: max KL {exact['kl_all_max']:.3g} > 1e-6")
    if not (min(exact["per_prompt"]["agree"]) == 1.0 and min(exact["per_prompt"]["prefix"]) == 1.0):
        failures.append("sanity row: greedy agreement < 100%")
    for name, record in result["cells"].items():
        for b in record["bytes"]:
            if not b["ok"]:
                failures.append(f"{name}: bytes check failed: {b['problems']}")
        if not all(record["feasible"]):
            failures.append(f"{name}: some layer stayed exact")
    ver = result["verification"]
    if ver is None or ver["max_abs_logit_diff"] > 1e-5 or ver["reports"] == 0:
        failures.append(f"sweep backend differs from a fresh RotateKBackend: {ver}")
    result["failures"] = failures
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fidelity_quick.json").write_text(json.dumps(_jsonable(result), indent=1))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI mode: SmolLM2, 2 prompts, asserts")
    parser.add_argument("--reduced", action="store_true",
                        help="the 24 prompts, r/d ∈ {1/4, 1/2} (SparK-style 1/8 too), fixed splits t ∈ {0.25, 0.5}")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: smollm2,gemma3")
    parser.add_argument("--lengths", default=None,
                        help="prompt lengths in tokens, one prompt each (default: 24 prompts of 1–4k tokens)")
    parser.add_argument("--steps", type=int, default=STEPS, help="tokens of each continuation (KL, greedy, PPL)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/, quick: none)")
    parser.add_argument("--jobs", type=int, default=2, help="models run in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild fidelity.md and the plot from the per-model JSON in --out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--position", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quick:
        result = quick(args.out)
        print(fidelity_report.sanity_line(result))
        print(f"verification: {result['verification']}")
        print(f"quick: {result['wall_s']:.0f} s")
        if result["failures"]:
            print("FAILED:\n  " + "\n  ".join(result["failures"]))
            return 1
        print("quick: sanity row exact, bytes checks pass")
        return 0

    lengths = args.lengths or ",".join(map(str, REDUCED_LENGTHS if args.reduced else FULL_LENGTHS))
    if args.worker:  # one model, JSON to --out (a file)
        cells = reduced_cells() if args.reduced else full_cells()
        progress = args.out.with_suffix(".partial.json")
        result = run_model(args.worker, tuple(int(x) for x in lengths.split(",")), cells, args.steps, args.seed,
                           args.position, partial=progress)
        args.out.write_text(json.dumps(_jsonable(result)))
        progress.unlink(missing_ok=True)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out_dir = args.out or ROOT / "docs"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {model: out_dir / f"fidelity_{model}.json" for model in models}
    command = "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    if not args.report_only:
        procs = []
        for position, model in enumerate(models):
            cmd = [sys.executable, __file__, "--worker", model, "--lengths", lengths, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--seed", str(args.seed), "--position", str(position),
                   "--out", str(partial[model])] + (["--reduced"] if args.reduced else [])
            if args.jobs > 1:
                procs.append((model, subprocess.Popen(cmd)))
            elif subprocess.call(cmd) != 0:
                raise SystemExit(f"fidelity: the {model} worker failed")
        for model, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"fidelity: the {model} worker failed (exit {proc.returncode})")
        wall = time.perf_counter() - start
        (out_dir / "fidelity.json").write_text(json.dumps(
            {"command": command.strip(), "wall_s": wall, "torch": torch.__version__,
             "python": platform.python_version(), "per_model": [partial[m].name for m in models]}, indent=1))
    results = fidelity_report.load([partial[m] for m in models])
    run = json.loads((out_dir / "fidelity.json").read_text())
    timing = "; ".join(f"{r['model']}: {r['timings']['total_s'] / 60:.0f} min" for r in results)
    header = (f"`{run['command']}` — wall time {run['wall_s'] / 60:.0f} min ({timing}); torch {run['torch']}, "
              f"CPU, {args.threads} thread(s) per model process.")
    path = fidelity_report.write(results, out_dir, header)
    print(fidelity_report.report(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
