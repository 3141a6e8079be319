"""The compressed cache under Hugging Face's ``StaticCache``: fixed capacity, written in place.

``generate(..., cache_implementation="static")`` is HF's recipe for compiled generation: its cache
buffers never change shape, so one decode graph serves every step and can be captured as a CUDA
graph (``mode="reduce-overhead"``). This module gives the compressed cache the same property.

Inside the prefill graph, each layer is compressed as with a ``DynamicCache``
(:mod:`rotatek_compile.prefill`), then laid out for static shapes
(:class:`StaticCompressedLayer`): the span as compressed, and the full-width rest (prompt and
text tokens, then every generated token) in buffers of a fixed capacity ``C``, with a validity
mask. HF position ``p`` (its ``cumulative_length``) goes to rest slot ``p − rest_offset``; the
decode graph writes each new token there in place. HF's own full-length buffers are replaced by
zero-storage stand-ins that carry the state (``rotatek_compile.state.stand_in``), so they do not
stay allocated.

With ``S`` prompt positions, ``L = max_cache_len`` and ``R`` rest tokens kept at prefill (the
widest row), the rest holds ``C = R + (L − S)`` slots: exactly what generation can still write.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from rotatek_compile.backend import (
    RotateKCacheError, StateShapeChecks, _hand_exact, _PrefillRunner, _symbolic_state)
from rotatek_compile.config import RotateKConfig
from rotatek_compile.prefill import PrefillRun, SpanOf, prompt_head, valid_tokens
from rotatek_compile.passes.static_cache import (
    SLIDING_WINDOW, StaticPlan, buffer_lengths, find_static_sites, rewrite_static_decode, rewrite_static_prefill)
from rotatek_compile.state import CompressedLayer, KeptExact, LayerPrefill, StandIn, attached, plain

logger = logging.getLogger("rotatek_compile")


@dataclasses.dataclass(frozen=True)
class StaticCompressedLayer(CompressedLayer):
    """A :class:`~rotatek_compile.state.CompressedLayer` whose rest segment has a fixed capacity.

    ``keys`` ``[B, H, C, d]``, ``values`` ``[B, H, C, dv]``, ``mask`` ``[B, C]``: the rest tokens
    kept at prefill, then free slots (mask ``False``) that the decode graph fills in place.
    """

    rest_offset: Tensor = dataclasses.field(kw_only=True)  # [] int64: HF position p is rest slot p - rest_offset

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


def to_static(layer: CompressedLayer, prompt_end: int, cache_length: int) -> StaticCompressedLayer:
    """Give ``layer``'s rest segment room for HF positions ``prompt_end .. cache_length - 1``."""
    kept = layer.keys.shape[2]  # R: rest tokens of the widest row (shorter rows masked)
    free = cache_length - prompt_end
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(CompressedLayer)}
    if free > 0:
        fields.update(keys=F.pad(layer.keys, (0, 0, 0, free)),  # [B, H, R + free, d]
                      values=F.pad(layer.values, (0, 0, 0, free)),
                      mask=F.pad(layer.mask, (0, free), value=False))  # [B, R + free]
    # a fill on the device: a copy from host memory would wait for all the queued work of the prefill
    offset = torch.full((), prompt_end - kept, dtype=torch.int64, device=layer.keys.device)
    return StaticCompressedLayer(**fields, rest_offset=offset)


def static_state_inputs(layers: Sequence[StaticCompressedLayer]) -> list[Tensor]:
    """The decode graph's extra inputs: ``state_inputs(method)`` per layer, then each layer's offset."""
    tensors = []
    for layer in layers:
        tensors += [*layer.span_key_parts, layer.span_values, layer.span_mask, layer.keys, layer.values, layer.mask]
    return tensors + [layer.rest_offset for layer in layers]


def compile_static(backend: Any, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Optional[Callable]:
    """The backend's path for graphs that read a StaticCache; ``None`` for any other graph.

    ``backend`` is the :class:`~rotatek_compile.backend.RotateKBackend` (its config, inner
    compiler and reports).
    """
    sites, _ = find_static_sites(gm.graph)
    if not sites:
        return None
    compressed = {i for i, x in enumerate(example_inputs) if attached(x) is not None}
    if compressed:
        return _compile_decode(backend, gm, example_inputs, compressed)
    created_here = any(site.keys.op != "placeholder" for site in sites)
    if not created_here and all(site.new_tokens == 1 for site in sites):
        return None  # one token on an uncompressed static cache: stays exact
    plan = rewrite_static_prefill(gm, backend.config.query_window)
    report = backend._report(plan)
    return _StaticPrefillRunner(plan, backend._compile(plan.module, list(example_inputs), cudagraphs=False),
                                backend, report)


def _compile_decode(backend: Any, gm: fx.GraphModule, example_inputs: Sequence[Any],
                    compressed: set[int]) -> Callable:
    config: RotateKConfig = backend.config
    plan = rewrite_static_decode(gm, config.method, config.kernel, compressed)
    read = {slot.past_keys_input for slot in plan.sites} if plan else set()
    if compressed - read:
        raise RotateKCacheError(
            f"rotatek: {len(compressed - read)} compressed static Key caches reach code that was not "
            "rewritten to read them (an attention pattern the pass does not recognise)")
    if any(tokens != 1 for tokens in plan.new_tokens):
        raise RotateKCacheError(
            "rotatek: several new tokens at once on a compressed StaticCache (a chunked prefill or a "
            "second prompt turn) are not supported; use a DynamicCache for those")
    report = backend._report(plan)
    layers = [attached(example_inputs[slot.past_keys_input]) for slot in plan.sites]
    for slot, layer in zip(plan.sites, layers):
        if not isinstance(layer, StaticCompressedLayer):
            raise RotateKCacheError(f"rotatek: the Key cache of {slot.layer} was compressed for a "
                                    "DynamicCache but reached a StaticCache graph")
    state = static_state_inputs(layers)
    per_site = len(state) - len(layers)  # everything but the offsets
    extra, symbols = state, []
    if backend.inner == "inductor":
        fakes, symbols = _symbolic_state(plan, state[:per_site], config.method)
        extra = fakes + _static_fakes(state[per_site:])
    checks = StateShapeChecks(symbols, config.method)
    backend.group_products(plan, report)
    compiled = backend._compile(plan.module, list(example_inputs) + extra)
    checks.take_guards()
    return _StaticDecodeRunner(plan, compiled, checks)


def _static_fakes(tensors: list[Tensor]) -> list[Tensor]:
    """Fake copies of ``tensors`` with their shapes fixed (the offsets are 0-dim)."""
    fake_mode = torch._guards.detect_fake_mode()
    if fake_mode is None:
        return tensors
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


class _StaticPrefillRun(PrefillRun):
    """:class:`~rotatek_compile.prefill.PrefillRun` on HF's static buffers ``[B, H, L, d]``: the
    prompt is HF positions ``0 .. prompt_end - 1`` (from the write positions, read at the first
    site), each layer is laid out for static shapes (:func:`to_static`).

    ``lengths``: each site's buffer length, known before the graph runs; a buffer shorter than the
    longest is a sliding window's, kept exact. None where the inputs do not tell them: every layer
    is then held to the last site, and those shorter than the longest are kept exact.
    """

    def __init__(self, config: RotateKConfig, scales: list[float], span_of: SpanOf, in_graph: list[bool],
                 lengths: Optional[list[int]]):
        super().__init__(config, scales, span_of, in_graph)
        self.lengths = lengths
        self.first = 0  # the first position written: 0 for a prefill on an empty cache
        self.prompt_end = 0

    def _start(self, keys: Tensor, context: list[Tensor]) -> None:
        positions, masks = context[0], context[1:]  # [T]: this call's cache positions
        self.first, last = (int(p) for p in positions[[0, -1]].tolist())
        self.prompt_end = last + 1
        if self.first == 0:
            self.span, self.source = self.span_of(masks, keys.shape[0], self.prompt_end)

    def _prefill(self, site: int, keys: Tensor, values: Tensor, window: Tensor,
                 mask_row: Optional[Tensor]) -> Optional[LayerPrefill]:
        if self.first != 0:  # tokens appended to a cache that was filled without compression
            return None
        length = keys.shape[2]
        # [B, L]: real tokens of the prompt
        valid = valid_tokens(mask_row, keys) & (torch.arange(length, device=keys.device) < self.prompt_end)
        span = (F.pad(self.span, (0, length - self.prompt_end), value=False) if self.span is not None
                else prompt_head(valid, self.config.query_window))
        return LayerPrefill(keys, values, window, span, valid, self.scales[site])

    def _grouping(self, layer_bytes: int, device: torch.device) -> tuple[int, bool]:
        if self.lengths is None:  # one group: the longest buffer is known at the last site
            return len(self.scales), False
        return super()._grouping(layer_bytes, device)

    def _left_exact(self, held: list) -> dict[int, KeptExact]:
        lengths = (dict(enumerate(self.lengths)) if self.lengths is not None
                   else {h.site: h.prefill.keys.shape[2] for h in held})  # every site is held
        longest = max(lengths.values())
        return {h.site: KeptExact(SLIDING_WINDOW, None) for h in held if lengths[h.site] < longest}

    def _built(self, site: int, layer: CompressedLayer) -> CompressedLayer:
        return to_static(layer, self.prompt_end, self.shapes[site][0][2])


class _StaticPrefillRunner(_PrefillRunner):
    """Runs the prefill graph, which compresses each layer into a :class:`StaticCompressedLayer`,
    and turns HF's buffers into stand-ins."""

    def _run(self, args: tuple) -> PrefillRun:
        return _StaticPrefillRun(self.config, [slot.scale for slot in self.plan.sites], self._span_of(args),
                                 in_graph=[slot.keys_output >= 0 for slot in self.plan.sites],
                                 lengths=buffer_lengths(self.plan, args))

    def _handed_over(self, run: PrefillRun, outputs: list, args: tuple) -> list:
        if run.first == 0:
            return super()._handed_over(run, outputs, args)
        logger.info("rotatek: static cache written from position %d, not compressed", run.first)
        for site, slot in enumerate(self.plan.sites):
            _hand_exact(outputs, slot, run.exact.get(site))
        return outputs[: self.plan.num_outputs]


_STATE_LIST = "_rotatek_static_state"


class _StaticDecodeRunner:
    """Runs a static decode graph on the state attached to HF's stand-ins.

    The flattened state is built once per cache and kept on the first site's stand-in (so it dies
    with the cache); later steps pass the same tensors, which the graph updates in place. What is
    kept there refers to the stand-ins only weakly: a stand-in reached from its own attribute is a
    reference cycle, which only Python's full (and rare) collection frees, so every request's
    compressed cache stayed allocated long after the request (a GPU ran out of memory serving
    requests of four sizes in a row).
    """

    def __init__(self, plan: StaticPlan, compiled: Callable, checks: StateShapeChecks):
        self.plan, self.compiled, self.checks = plan, compiled, checks
        self.key_inputs = [slot.past_keys_input for slot in plan.sites]

    def __call__(self, *args):
        first = args[self.key_inputs[0]]
        kept = getattr(first, _STATE_LIST, None)
        if kept is None or kept[0] is not self:
            stand_ins = {i: (weakref.ref(a), plain(a)) for i, a in enumerate(args) if isinstance(a, StandIn)}
            kept = (self, self._state(args), stand_ins)
            setattr(first, _STATE_LIST, kept)
        _, state, stand_ins = kept
        args = list(args)
        for i, (original, as_plain) in stand_ins.items():  # the graph gets them as plain tensors
            if args[i] is original():
                args[i] = as_plain
        return self.compiled(*args, *state)

    def _state(self, args: tuple) -> list[Tensor]:
        layers = []
        for slot, index in zip(self.plan.sites, self.key_inputs):
            layer = attached(args[index])
            if not isinstance(layer, StaticCompressedLayer):
                raise RotateKCacheError(
                    f"rotatek: the Key cache of {slot.layer} was not produced by a rotatek-compiled prefill "
                    "on a StaticCache (cache reordering, cropping or mixing caches is not supported)")
            layers.append(layer)
        state = static_state_inputs(layers)
        self.checks.check(state)
        return state
