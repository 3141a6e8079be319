"""What the backend does to a model: sites found, rewritten, skipped, and the Key bytes saved."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch

from rotatek_compile.backend import GraphReport, RotateKBackend
from rotatek_compile.config import RotateKConfig
from rotatek_compile.state import attached


@dataclasses.dataclass(frozen=True)
class CacheBytes:
    """Bytes of every tensor that really holds a KV cache (stand-ins counted by what they carry,
    plus their own one-element storage)."""

    keys: int  # Key tensors: rest segments, span Key parts and their basis
    values: int
    span_keys: int  # per-token Key parts of the compressed span (0 for an uncompressed cache)
    compressed_layers: int
    span_basis: int = 0  # per-head parts that read the span: R and δμ, or ThinK's channel indices
    masks: int = 0  # the compressed layers' segment masks

    @property
    def total(self) -> int:
        return self.keys + self.values + self.masks


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def cache_bytes(cache: Any) -> CacheBytes:
    """Measure an HF cache (``DynamicCache`` or anything with ``.layers[i].keys/.values``)."""
    keys = values = span = basis = masks = compressed = 0
    for layer in cache.layers:
        state = attached(layer.keys)
        if state is not None:
            keys += state.key_bytes + _storage_bytes(layer.keys)
            values += state.value_bytes + _storage_bytes(layer.values)
            span += state.span_key_bytes
            basis += state.basis_bytes
            masks += state.mask_bytes
            compressed += 1
        elif layer.keys is not None and isinstance(layer.keys, torch.Tensor):
            keys += _storage_bytes(layer.keys)
            values += _storage_bytes(layer.values)
    return CacheBytes(keys, values, span, compressed, basis, masks)


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
    # rewritten sites whose prefill kept the exact cache (compressed form not smaller), and why
    kept_exact: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"attention sites rewritten: {len(self.rewritten)}"]
        lines += [f"  {layer}: r = {self.rank[layer]}" if layer in self.rank else f"  {layer}: kept exact (below)"
                  for layer in self.rewritten]
        lines.append(f"attention sites left exact: {len(self.skipped)}")
        lines += [f"  {layer}: {reason}" for layer, reason in self.skipped]
        if self.kept_exact:
            lines.append(f"rewritten sites kept exact at prefill: {len(self.kept_exact)}")
            lines += [f"  {layer}: {reason}" for layer, reason in self.kept_exact]
        ratio = self.compressed.keys / max(self.baseline.keys, 1)
        lines.append(f"Key cache bytes: {self.baseline.keys} → {self.compressed.keys} ({ratio:.1%})")
        lines.append(f"KV cache bytes: {self.baseline.total} → {self.compressed.total}")
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
        baseline = model(**example_inputs, use_cache=True).past_key_values
        compiled = torch.compile(model.forward, backend=backend)
        result = compiled(**example_inputs, use_cache=True).past_key_values
    rewritten = [layer for report in backend.reports for layer in report.rewritten]
    skipped = [item for report in backend.reports for item in report.skipped]
    kept_exact = [item for report in backend.reports for item in report.kept_exact.items()]
    states = [attached(layer.keys) for layer in result.layers]
    states = [state for state in states if state is not None]  # in layer order, like the sites
    compressed = [name for name in rewritten if name not in dict(kept_exact)]
    rank = {name: state.rank for name, state in zip(compressed, states)}
    return Explanation(backend.reports, rewritten, skipped, rank, cache_bytes(baseline), cache_bytes(result), config,
                       kept_exact)
