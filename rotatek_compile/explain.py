"""What the backend does to a model: sites found, rewritten, skipped, and the Key bytes saved."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

import torch

from rotatek_compile.backend import GraphReport, RotateKBackend
from rotatek_compile.config import RotateKConfig
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.state import SpanSplit, attached

logger = logging.getLogger("rotatek_compile")


@dataclasses.dataclass(frozen=True)
class CacheBytes:
    """Bytes of every tensor that really holds a KV cache (stand-ins counted by what they carry,
    plus their own one-element storage)."""

    keys: int  # Key tensors: rest segments, span Key parts and their basis
    values: int
    span_keys: int  # per-token Key parts of the compressed span (0 for an uncompressed cache)
    compressed_layers: int
    span_basis: int = 0  # per-head parts that read the span: R and δμ, or ThinK's channel indices
    other: int = 0  # other per-layer state: linear-attention / conv states, indexer Keys, ...
    masks: int = 0  # the compressed layers' segment masks

    @property
    def total(self) -> int:
        return self.keys + self.values + self.masks


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a layer attribute: a tensor, or a dict/list/tuple of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _caches(cache: Any) -> list[Any]:
    """Every cache with ``.layers`` inside ``cache``: an HF cache, an ``EncoderDecoderCache``
    (its self- and cross-attention caches), or a model/generate output that holds one."""
    if cache is None:
        return []
    if hasattr(cache, "self_attention_cache"):
        return _caches(cache.self_attention_cache) + _caches(getattr(cache, "cross_attention_cache", None))
    if hasattr(cache, "layers"):
        return [cache]
    inner = output_cache(cache)  # an output object
    if inner is not None:
        return _caches(inner)
    raise TypeError(f"rotatek: cache_bytes() needs an HF cache or an output that holds one, "
                    f"not {type(cache).__name__}")


def span_split(cache: Any) -> Optional[SpanSplit]:
    """What the compressed layers of ``cache`` did with their spans at prefill, summed over layers
    and rows: tokens kept exact / compressed / dropped and the span's true bytes (``None`` for a
    cache without a compressed layer)."""
    splits = [state.split for each in _caches(cache) for layer in each.layers
              if (state := attached(getattr(layer, "keys", None))) is not None and state.split is not None]
    return sum(splits[1:], splits[0]) if splits else None


def cache_bytes(cache: Any) -> CacheBytes:
    """Measure an HF cache: ``DynamicCache``, ``StaticCache``, hybrid caches (linear-attention and
    conv states count as ``other``), ``EncoderDecoderCache``, or an output holding one.

    Every tensor is counted by the bytes of the storage it owns (a view of a larger buffer counts
    that buffer); a stand-in counts the compressed state it carries (every tensor of it, the
    segment masks included) and its own one-element storage.
    """
    keys = values = span = basis = masks = compressed = other = 0
    for each in _caches(cache):
        for layer in each.layers:
            state = attached(getattr(layer, "keys", None))
            if state is not None:
                keys += state.key_bytes + _storage_bytes(layer.keys)
                values += state.value_bytes + _storage_bytes(layer.values)
                span += state.span_key_bytes
                basis += state.basis_bytes
                masks += state.mask_bytes
                compressed += 1
                continue
            for name, value in vars(layer).items():
                size = sum(_storage_bytes(t) for t in _tensors(value))
                if name == "keys":
                    keys += size
                elif name == "values":
                    values += size
                elif not name.startswith("_"):
                    other += size
    return CacheBytes(keys, values, span, compressed, basis, other, masks)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The report of :func:`explain`."""

    graphs: list[GraphReport]
    rewritten: list[str]
    skipped: list[tuple[str, str]]
    rank: dict[str, int]
    baseline: CacheBytes
    compressed: CacheBytes
    config: Optional[RotateKConfig] = None
    spans: dict[str, str] = dataclasses.field(default_factory=dict)  # layer → what its span is
    # rewritten sites whose prefill kept the exact cache (compressed form not smaller), and why
    kept_exact: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    span: Optional[SpanSplit] = None  # the compressed layers' spans, summed (span_split)

    @property
    def grows(self) -> bool:
        """The compressed cache holds more Key bytes than the uncompressed one."""
        return self.compressed.keys > self.baseline.keys

    def __str__(self) -> str:
        lines = [f"attention sites rewritten: {len(self.rewritten)}"]
        lines += [f"  {layer}: r = {self.rank[layer]}, span = {self.spans.get(layer, '?')}" if layer in self.rank
                  else f"  {layer}: kept exact at prefill (below)"
                  for layer in self.rewritten]
        lines.append(f"attention sites left exact: {len(self.skipped)}")
        lines += [f"  {layer}: {reason}" for layer, reason in self.skipped]
        if self.kept_exact:
            lines.append(f"rewritten sites kept exact at prefill: {len(self.kept_exact)}")
            lines += [f"  {layer}: {reason}" for layer, reason in self.kept_exact]
        ratio = self.compressed.keys / max(self.baseline.keys, 1)
        lines.append(f"Key cache bytes: {self.baseline.keys} → {self.compressed.keys} ({ratio:.1%})")
        if self.grows:
            lines.append("WARNING: the compressed Key cache is LARGER than the uncompressed one "
                         "(the per-head basis outweighs the saving on so short a span)")
        lines.append(f"KV cache bytes: {self.baseline.total} → {self.compressed.total}")
        if self.span is not None:
            lines.append(f"span tokens (all compressed layers): {self.span.span}: {self.span.exact} kept exact, "
                         f"{self.span.compressed} compressed, {self.span.dropped} dropped; span KV bytes "
                         f"{self.span.stored_bytes} of {self.span.full_bytes} ({self.span.byte_ratio:.1%}), "
                         "basis and masks included")
        if self.compressed.compressed_layers:
            how = "" if self.config is None else (
                f" ({self.config.method}, token_keep {self.config.token_keep:g})")
            lines.append(f"compressed span{how}: {self.compressed.span_keys} bytes of per-token Key parts "
                         f"+ {self.compressed.span_basis} bytes of per-head basis/indices, "
                         f"{self.compressed.compressed_layers} layers")
        return "\n".join(lines)


def explain(model: torch.nn.Module, example_inputs: Mapping[str, Any],
            config: Optional[RotateKConfig] = None, **options) -> Explanation:
    """Run one prefill of ``model`` on ``example_inputs`` exact and compiled; report what changed.

    ``example_inputs`` are the keyword arguments of ``model(...)`` (``input_ids``, ``pixel_values``,
    ...). Compiles a separate ``torch.compile`` of ``model.forward``; the model itself is untouched.
    """
    config = config or RotateKConfig.from_options({k: v for k, v in options.items() if k != "inner"})
    backend = RotateKBackend(config, inner=options.get("inner", "inductor"))
    with torch.no_grad():
        baseline = _caches(model(**example_inputs, use_cache=True))
        compiled = torch.compile(model.forward, backend=backend)
        result = _caches(compiled(**example_inputs, use_cache=True))
    rewritten = [layer for report in backend.reports for layer in report.rewritten]
    skipped = [item for report in backend.reports for item in report.skipped]
    kept_exact = [item for report in backend.reports for item in report.kept_exact.items()]
    states = [attached(getattr(layer, "keys", None)) for cache in result for layer in cache.layers]
    states = [state for state in states if state is not None]  # in layer order, like the sites
    compressed = [name for name in rewritten if name not in dict(kept_exact)]
    rank = {name: state.rank for name, state in zip(compressed, states)}
    spans = {name: f"{state.span_source}, {state.span_mask.sum(-1).tolist()} tokens per row"
             for name, state in zip(compressed, states)}
    split = [each for cache in result if (each := span_split(cache)) is not None]
    explanation = Explanation(backend.reports, rewritten, skipped, rank, _sum_bytes(baseline),
                              _sum_bytes(result), config, spans, kept_exact,
                              sum(split[1:], split[0]) if split else None)
    if explanation.grows:
        logger.warning("rotatek: compression grows the Key cache here: %d → %d bytes",
                       explanation.baseline.keys, explanation.compressed.keys)
    return explanation


def _sum_bytes(caches: list[Any]) -> CacheBytes:
    parts = [cache_bytes(cache) for cache in caches] or [CacheBytes(0, 0, 0, 0)]
    return CacheBytes(*(sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(CacheBytes)))
