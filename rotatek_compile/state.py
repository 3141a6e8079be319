"""The compressed KV cache of one layer, and how it travels from prefill to decode.

Hugging Face's cache keeps, per layer, ``keys``/``values`` tensors whose shape ``[B, H, S, d]`` it
reads for its bookkeeping, and Dynamo writes the compiled graph's outputs back into them. The
backend hands HF a *stand-in* of that exact shape with zero strides over a single element (no
storage), and attaches the real, compressed storage to it as :class:`CompressedLayer`. On the
next step the stand-in comes back as a graph input, and the backend's runtime wrapper reads the
attached state. The state therefore lives exactly as long as the cache that holds the stand-in:
two generations never share it, and nothing leaks when the cache is dropped.

Layout: attention is a softmax over a *set* of tokens, so the cache keeps two segments, each with
its own Keys, Values and validity mask, in any order:

- span: the compressed tokens (image tokens, or the prompt's head for text-only models);
- rest: every other real token at full width (prompt, text, and each generated token), and the
  span's attention sinks (:mod:`rotatek_compile.tiers`), which are never compressed.

Padding tokens are dropped at prefill (they are never attended).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from rotatek_compile import kernels, tiers
from rotatek_compile.config import RotateKConfig
from rotatek_compile.kernels import reference

logger = logging.getLogger("rotatek_compile")

_ATTRIBUTE = "_rotatek_layer"

# What each method keeps of the span's Keys, in the order of ``CompressedLayer.span_key_parts``
SPAN_KEY_PARTS = {
    "rotatek": ("span_keys", "rotation", "mean_residual"),
    "think": ("span_keys", "channels"),
    "spark": ("span_key_values", "span_key_channels", "span_key_fill"),
}


@dataclasses.dataclass(frozen=True)
class CompressedLayer:
    """One layer's KV cache after prefill. ``H`` KV heads, ``Sv`` span and ``Sf`` rest tokens.

    ``span_key_parts`` depends on the method (:data:`SPAN_KEY_PARTS` names them):
    RotateK: ``(K̃ [B, H, Sv, r], R [B, H, d, r], δμ [B, H, d])``, all in the cache dtype; ThinK:
    ``(kept channels [B, H, Sv, r], their indices [B, H, r] int16)``; SparK-style: ``(kept values
    [B, H, Sv, r], channels [B, H, Sv, r] int16, fill [B, H, Sv])``. ``split`` says what became of
    the span's tokens at prefill.
    """

    method: str
    span_key_parts: tuple[Tensor, ...]
    span_values: Tensor  # [B, H, Sv, dv]
    span_mask: Tensor  # [B, Sv] bool
    keys: Tensor  # [B, H, Sf, d]
    values: Tensor  # [B, H, Sf, dv]
    mask: Tensor  # [B, Sf] bool
    head_dim: int
    span_source: str = ""  # what the span is: "image tokens" or the prompt fallback and why
    split: Optional["SpanSplit"] = None
    # per row, real prompt tokens dropped at prefill (host ints, read by the decode mask check)
    dropped: Optional[tuple[int, ...]] = None

    @property
    def span_key_bytes(self) -> int:
        """Bytes of the span's per-token Key parts: K̃ (RotateK), kept channels (ThinK), or
        values+channels+fill (SparK)."""
        per_token = self.span_key_parts if self.method == "spark" else self.span_key_parts[:1]
        return sum(_nbytes(t) for t in per_token)

    @property
    def basis_bytes(self) -> int:
        """Bytes kept per (row, head) to read the span: R and δμ (RotateK), the channel indices
        (ThinK), none (SparK)."""
        return 0 if self.method == "spark" else sum(_nbytes(t) for t in self.span_key_parts[1:])

    @property
    def key_bytes(self) -> int:
        """Bytes of every tensor that holds Keys: span, basis, and the full-width rest."""
        return self.span_key_bytes + self.basis_bytes + _nbytes(self.keys)

    @property
    def value_bytes(self) -> int:
        return _nbytes(self.span_values) + _nbytes(self.values)

    @property
    def mask_bytes(self) -> int:
        """Bytes of the two segments' validity masks."""
        return _nbytes(self.span_mask) + _nbytes(self.mask)

    @property
    def stored_bytes(self) -> int:
        """Bytes of every tensor the layer keeps: Keys, basis, Values and masks."""
        return self.key_bytes + self.value_bytes + self.mask_bytes

    @property
    def rank(self) -> int:
        """Key channels kept per span token."""
        return self.span_key_parts[0].shape[-1]

    @property
    def span_tokens(self) -> int:
        return self.span_mask.shape[1]

    def held_tokens(self) -> Tensor:
        """``[B]`` real tokens the layer holds, both segments."""
        return self.span_mask.sum(dim=1) + self.mask.sum(dim=1)

    def with_rest(self, keys: Tensor, values: Tensor, mask: Tensor) -> "CompressedLayer":
        return dataclasses.replace(self, keys=keys, values=values, mask=mask)


@dataclasses.dataclass(frozen=True)
class SpanSplit:
    """What became of one layer's span tokens at prefill, summed over batch rows (every KV head
    keeps as many tokens of each kind), and the span's true bytes.

    ``stored_bytes`` is every byte the layer stores at prefill (Keys, basis, Values, masks, padding
    slots) less what the tokens outside the span take at full width; ``full_bytes`` is the span's
    Keys and Values uncompressed. Layers add up with ``+``.
    """

    span: int  # real span tokens
    exact: int  # kept at full width in the rest segment (attention sinks, exact tier)
    compressed: int  # kept in the compressed span segment
    dropped: int  # dropped by token pruning
    stored_bytes: int = 0
    full_bytes: int = 0

    @property
    def byte_ratio(self) -> float:
        """The span's stored bytes over its uncompressed bytes."""
        return self.stored_bytes / max(self.full_bytes, 1)

    def __add__(self, other: "SpanSplit") -> "SpanSplit":
        return SpanSplit(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def _span_split(span: int, exact: int, compressed: int, outside: int, token_bytes: int,
                stored_bytes: int) -> SpanSplit:
    """``outside`` real tokens lie outside the span; ``token_bytes`` is one token's K+V (all heads)."""
    return SpanSplit(span, exact, compressed, span - exact - compressed,
                     stored_bytes - outside * token_bytes, span * token_bytes)


@dataclasses.dataclass(frozen=True)
class KeptExact:
    """A layer left uncompressed: HF's cache keeps its exact Keys and Values, because the
    compressed form would not be smaller (``reason`` says by how much), or because the layer is
    not what compression assumes (a sliding window: ``split`` is then None)."""

    reason: str
    split: Optional[SpanSplit]


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# Tensor metadata that HF's bookkeeping reads off a cache tensor outside the compiled graph
_METADATA = frozenset({
    "size", "dim", "numel", "element_size", "stride", "storage_offset", "data_ptr", "get_device",
    "untyped_storage", "_typed_storage", "__get__", "__len__", "__repr__", "__format__", "_version",
})


def _reads_metadata(name: str) -> bool:
    return name in _METADATA or name.startswith(("is_", "_is_"))


def _dynamo_is_tracing() -> bool:
    """Dynamo building its view of a real input tensor (outside the traced code)."""
    return torch._guards.TracingContext.try_get() is not None

_FALLBACK_CAUSES = (
    "usual causes: Dynamo ran the model uncompiled (its recompile limit, "
    "torch._dynamo.config.recompile_limit, was hit: see the WARNING from torch._dynamo above), "
    "beam search or another cache reordering, cache cropping (assisted decoding), or the "
    "uncompiled model called on a cache that the compiled one returned")


class StandIn(torch.Tensor):
    """What HF's cache holds in place of a compressed layer's Keys or Values.

    A one-element tensor seen as the full ``[B, H, S, d]`` shape (all strides 0), whose one value is
    NaN, with the real state attached (:func:`attached`). Compiled graphs read only its shape
    (Dynamo traces it as a plain tensor). Anywhere else, any operation on it but its metadata
    raises: code that was not compiled by the backend (Dynamo's fallback past its recompile
    limit, beam search, cropping) would otherwise compute attention on NaN and answer nothing.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # first: Dynamo inlines this method and folds it to True
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if _reads_metadata(name) or _dynamo_is_tracing():
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        from rotatek_compile.backend import RotateKCacheError  # the public error type

        raise RotateKCacheError(
            f"rotatek: a compressed KV cache was read by code the backend did not compile "
            f"({name or func}); {_FALLBACK_CAUSES}")


def stand_in(shape: torch.Size, like: Tensor, layer: Optional[CompressedLayer]) -> Tensor:
    """A :class:`StandIn` of ``shape`` on ``like``'s dtype and device that carries ``layer``."""
    tensor = torch.full((), float("nan"), dtype=like.dtype, device=like.device).expand(shape)
    tensor = tensor.as_subclass(StandIn)
    setattr(tensor, _ATTRIBUTE, layer)
    # the cache length grows every step: trace it as a symbol from the first decode step on,
    # instead of a first graph specialised to the prompt's length
    torch._dynamo.maybe_mark_dynamic(tensor, 2)
    return tensor


def become_stand_in(tensor: Tensor, layer: Optional[CompressedLayer]) -> None:
    """Turn HF's buffer itself into a :class:`StandIn` (same object, one NaN element, all strides 0):
    its memory is freed while the cache keeps pointing at it."""
    like = stand_in(tensor.shape, tensor, layer)
    tensor.set_(like.untyped_storage(), 0, tensor.shape, like.stride())
    tensor.__class__ = StandIn
    setattr(tensor, _ATTRIBUTE, layer)


def plain(tensor: object) -> object:
    """A stand-in as a plain tensor (same storage, no trap), for the backend's own graphs."""
    return tensor.as_subclass(Tensor) if isinstance(tensor, StandIn) else tensor


def attached(tensor: object) -> Optional[CompressedLayer]:
    """The :class:`CompressedLayer` a stand-in carries, or ``None`` for any other object."""
    return getattr(tensor, _ATTRIBUTE, None) if isinstance(tensor, Tensor) else None


def is_stand_in(tensor: object) -> bool:
    return isinstance(tensor, StandIn)


def derived_from_stand_in(tensor: Tensor) -> bool:
    """A stand-in, or a copy/view of one (NaN where Keys should be): cache reorder, crop, ..."""
    if is_stand_in(tensor):
        return True
    return tensor.is_floating_point() and tensor.numel() > 0 and bool(tensor.reshape(-1)[0].isnan())


# Each segment keeps at least this many slots (padding slots are masked): the compiled decode step
# may assume a length of at least 2 (a length of 1 has its own stride rules).
MIN_SEGMENT = 2


def _compact(selected: Tensor, widest: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Positions of the ``True`` entries of each row, left-aligned, and which slots are real.

    ``selected`` ``[B, S]`` bool → ``positions`` ``[B, n]`` (ascending, padded with 0) and
    ``mask`` ``[B, n]`` with ``n`` the largest count in a row (at least ``MIN_SEGMENT``);
    ``widest``: that count, when the caller has it (else it is read from the device).
    """
    counts = selected.sum(dim=1)  # [B]
    if widest is None:
        widest = int(counts.max()) if selected.numel() else 0
    return _compact_sorted(_true_first(selected, widest), counts, widest)


def _true_first(selected: Tensor, widest: int) -> Tensor:
    """``selected`` ``[..., S]`` bool → ``[..., max(S, MIN_SEGMENT)]``: each row's positions, its
    ``True`` ones first, each group ascending (a stable sort; past ``S``: padding positions);
    ``widest``: the largest count of ``True`` in a row."""
    width = max(widest, MIN_SEGMENT)
    if selected.shape[-1] < width:
        selected = torch.nn.functional.pad(selected, (0, width - selected.shape[-1]))
    return torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices


def _compact_sorted(order: Tensor, counts: Tensor, widest: int) -> tuple[Tensor, Tensor]:
    """:func:`_compact` from :func:`_true_first`'s ``order`` ``[B, S']`` and the ``counts`` ``[B]``."""
    width = max(widest, MIN_SEGMENT)
    mask = torch.arange(width, device=order.device)[None, :] < counts[:, None]
    return torch.where(mask, order[:, :width], 0), mask


def _gather_positions(tensor: Tensor, positions: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``tensor`` ``[B, H, S, x]`` at ``positions`` ``[B, n]`` (same for all heads) → ``[B, H, n, x]``."""
    batch, heads, _, width = tensor.shape
    index = positions.view(batch, 1, -1, 1).expand(-1, heads, -1, width)
    return tensor.gather(2, index) if out is None else torch.gather(tensor, 2, index, out=out)


@dataclasses.dataclass
class LayerPrefill:
    """What :func:`compress_layer` takes of one layer (see its parameters)."""

    keys: Tensor  # [B, H, S, d]
    values: Tensor  # [B, H, S, dv]
    queries: Tensor  # [B, Hq, W, d]
    span: Tensor  # [B, S] bool
    valid: Tensor  # [B, S] bool
    scale: float


@dataclasses.dataclass(frozen=True)
class SpanTokens:
    """A layer's span once its attention sinks are out, and what the basis needs of it."""

    count: int  # real span tokens, sinks included
    per_row: Tensor  # [B] the same per row
    compressed_count: int  # the span's tokens less its sinks, all rows
    selected: Tensor  # [B, S] bool: those tokens, in place
    positions: Tensor  # [B, Sv] where those are (:func:`_compact`)
    mask: Tensor  # [B, Sv] bool: which of those slots are real
    padded: bool  # some of those slots are not
    rest_positions: Tensor  # [B, Sf] the real tokens outside them (the rest segment)
    rest_mask: Tensor  # [B, Sf] bool
    outside: int  # real tokens outside the span, all rows
    # RotateK's basis as stored, (R̂ [B, H, d, r], δμ [B, H, d]) in the cache dtype, if solved
    basis: Optional[tuple[Tensor, Tensor]] = None


def compress_layer(
    keys: Tensor,
    values: Tensor,
    queries: Tensor,
    span: Tensor,
    valid: Tensor,
    config: RotateKConfig,
    scale: float,
) -> CompressedLayer | KeptExact:
    """Build a layer's compressed cache from its prefill Keys and Values.

    A layer whose compressed form (every stored tensor: Key parts, basis, Values, masks, both
    segments) would not be smaller than HF's exact Keys and Values is left exact (:class:`KeptExact`):
    tiny spans, where the per-head basis outweighs the channels saved. ``r = d`` with every token
    kept asks to save nothing and is the compressed path's exactness check: it is never left exact.

    Parameters
    ----------
    keys, values : Tensor
        ``[B, H, S, d]``, ``[B, H, S, dv]``: post-RoPE Keys and the Values of the whole prompt.
    queries : Tensor
        ``[B, Hq, W, d]`` post-RoPE queries of the last ``W`` prompt tokens.
    span : Tensor
        ``[B, S]`` bool, the tokens to compress. Its attention sinks (the first real token of each
        row, and tokens that take a large share of the window's attention:
        :func:`rotatek_compile.tiers.attention_sinks`) go to the exact rest segment instead.
    valid : Tensor
        ``[B, S]`` bool, the real (non-padding) tokens.
    config : RotateKConfig
    scale : float
        The layer's softmax scale (token pruning scores use it).
    """
    return next(compress_layers([LayerPrefill(keys, values, queries, span, valid, scale)], config))


# Layers whose Keys are copied into one stack, as more batch rows, so that one call serves them
# all (the basis choice, on the span's gathered Keys and Values; the eager covariances, which a GPU
# runs only with ``kernel="reference"``: the fused ones read every layer in place): on a GPU a call
# per layer costs a few microseconds of host time per operation and leaves most of the GPU idle at
# a few thousand tokens. Bytes of Keys per stack, by device type; a layer larger than that runs
# alone, on its own tensors. None on a CPU, whose operations cost their arithmetic, not their
# dispatch: there the stacks' larger working sets made 32 layers of 2048 tokens 1.6x slower.
STACK_BYTES = {"cuda": 256 << 20}


def _layer_shape(prefill: LayerPrefill) -> tuple:
    """What layers stacked as batch rows must share."""
    return (prefill.keys.shape, prefill.values.shape, prefill.queries.shape, prefill.span.shape, prefill.scale,
            prefill.keys.dtype, prefill.keys.device)


def _stacks(layers: list[LayerPrefill], key: Callable[[int], tuple]) -> list[list[int]]:
    """``layers`` cut into runs of consecutive layers of equal ``key(index)`` whose Keys take at most
    :data:`STACK_BYTES` together (a run may be one layer)."""
    runs: list[list[int]] = []
    for index, prefill in enumerate(layers):
        run = runs[-1] if runs else []
        limit = STACK_BYTES.get(prefill.keys.device.type, 0)
        if run and key(run[-1]) == key(index) and (len(run) + 1) * _nbytes(prefill.keys) <= limit:
            run.append(index)
        else:
            runs.append([index])
    return runs


def _rows(tensors: list[Tensor]) -> Tensor:
    """``[B, ...]`` tensors of a stack's layers as one ``[G·B, ...]`` (the tensor itself when G = 1)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _groups(layers: list[LayerPrefill], key: Callable[[LayerPrefill], tuple]) -> list[list[int]]:
    """The indices of ``layers``, grouped by equal ``key``, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for index, prefill in enumerate(layers):
        groups.setdefault(key(prefill), []).append(index)
    return list(groups.values())


def _per_group(layers: list[LayerPrefill], key: Callable[[LayerPrefill], tuple],
               build: Callable[[list[int]], list]) -> list:
    """``build`` once per group of layers of equal ``key`` (given their indices), its results put
    back in the layers' order."""
    results: list = [None] * len(layers)
    for group in _groups(layers, key):
        for index, result in zip(group, build(group), strict=True):
            results[index] = result
    return results


def _window_shares(layers: list[LayerPrefill], kernel: str) -> Tensor:
    """``[L, B, S]`` fp32: each layer's :func:`rotatek_compile.tiers.window_share`, its largest over
    the KV heads. On a GPU the fused kernels take all layers alike (Keys of one shape and layout,
    one scale) in one call; otherwise layer by layer (the eager form's fp32 logits are twice the
    Keys' bytes: not stacked)."""
    fused = kernels.compress_kernels(layers[0].keys.device, kernel)
    if fused is None:
        return torch.stack([tiers.window_share(p.queries, p.keys, p.scale, p.span & p.valid, kernel).amax(dim=1)
                            for p in layers])
    shares = _per_group(layers, lambda p: (_layout(p.keys), p.queries.shape, p.scale), lambda group: list(
        fused.window_shares_triton([layers[i].queries for i in group], [layers[i].keys for i in group],
                                   layers[group[0]].scale, [layers[i].span & layers[i].valid for i in group])
        .amax(dim=2)))  # [G, B, S]: one reduction for the group
    return torch.stack(shares)


def _layout(tensor: Tensor) -> tuple:
    """What layers batched into one launch of the fused statistics kernels must share."""
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device


@dataclasses.dataclass
class _ShapeCounts:
    """The sinks and segments of layers whose masks are ``[B, S]`` alike, decided on the device."""

    indices: list[int]  # the layers', in :class:`TokenCounts`
    per_row: Tensor  # [L, B] span tokens, sinks included
    compressed: Tensor  # [L, B, S] bool: the span less its sinks
    counts: Tensor  # [L, 3, B]: span, compressed and rest tokens per row
    kept_order: Tensor  # [L, B, max(S, MIN_SEGMENT)]: each row's compressed positions first
    rest_order: Tensor  # the same for the rest tokens
    host: Tensor  # ``counts`` in host memory (pinned on a GPU), once ``copied`` has passed
    copied: Optional[torch.cuda.Event]  # None: ``host`` is ready


def _counted(layers: list[LayerPrefill], indices: list[int], kernel: str) -> _ShapeCounts:
    """:class:`_ShapeCounts` of ``layers``: the sinks' attention shares (:func:`_window_shares`),
    then the rest once on the stacked ``[L, B, S]`` masks; on a GPU the counts are copied to pinned
    host memory behind the queued work, and nothing waits for it."""
    shares = _window_shares(layers, kernel)  # [L, B, S]: each token's largest share over the KV heads
    valid = torch.stack([prefill.valid for prefill in layers])  # [L, B, S]
    span = torch.stack([prefill.span for prefill in layers]) & valid
    compressed = span & ~tiers.sinks_by_share(shares, span, valid)
    rest = valid & ~compressed
    per_row = span.sum(dim=-1)  # [L, B]
    counts = torch.stack([per_row, compressed.sum(dim=-1), rest.sum(dim=-1)], dim=1)  # [L, 3, B]
    length = span.shape[-1]  # the widest a row's count can be: one sort for all layers, before the counts
    kept_order, rest_order = _true_first(compressed, length), _true_first(rest, length)
    copied = None
    host = counts
    if counts.is_cuda:
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    return _ShapeCounts(indices, per_row, compressed, counts, kept_order, rest_order, host, copied)


def _span_tokens(counted: _ShapeCounts) -> list[SpanTokens]:
    """Each layer's span less its sinks, and where its span and rest tokens lie, from the counts
    that size the segments: the one host read (on a GPU, a wait for the counts' copy only)."""
    if counted.copied is not None:
        counted.copied.synchronize()
    per_layer = counted.host.tolist()  # [L][3][B]
    tokens = []
    for index, (spans, kept, rests) in enumerate(per_layer):
        positions, mask = _compact_sorted(counted.kept_order[index], counted.counts[index, 1], max(kept, default=0))
        rest_positions, rest_mask = _compact_sorted(counted.rest_order[index], counted.counts[index, 2],
                                                    max(rests, default=0))
        sinks = sum(spans) - sum(kept)
        tokens.append(SpanTokens(count=sum(spans), per_row=counted.per_row[index], compressed_count=sum(kept),
                                 selected=counted.compressed[index], positions=positions, mask=mask,
                                 padded=min(kept, default=0) < mask.shape[1],
                                 rest_positions=rest_positions, rest_mask=rest_mask, outside=sum(rests) - sinks))
    return tokens


@dataclasses.dataclass
class TokenCounts:
    """:func:`count_tokens`' result: the layers, with their sinks and segments decided on the device."""

    layers: list[LayerPrefill]
    config: RotateKConfig
    shapes: list[_ShapeCounts]  # per prompt shape

    def ready(self) -> bool:
        """Whether the token counts have reached host memory (:func:`compress_counted` would not wait)."""
        return all(counted.copied is None or counted.copied.query() for counted in self.shapes)

    def span_tokens(self) -> list[SpanTokens]:
        tokens: list = [None] * len(self.layers)
        for counted in self.shapes:
            for index, span in zip(counted.indices, _span_tokens(counted), strict=True):
                tokens[index] = span
        return tokens


def count_tokens(layers: list[LayerPrefill], config: RotateKConfig) -> TokenCounts:
    """The first step of :func:`compress_layers`, which only queues work: each layer's attention
    sinks and segments, decided on the device for all layers of one prompt shape at once, and the
    token counts that size the segments copied to host memory without waiting for them. A caller
    that has other work to queue (the prefill's next layers) does so before
    :func:`compress_counted` reads the counts: the device then runs it meanwhile."""
    groups = _groups(layers, lambda prefill: (prefill.span.shape, prefill.span.device))
    return TokenCounts(layers, config, [_counted([layers[i] for i in group], group, config.kernel)
                                        for group in groups])


def compress_layers(layers: list[LayerPrefill], config: RotateKConfig) -> Iterator[CompressedLayer | KeptExact]:
    """:func:`compress_layer` of each layer, in order, with RotateK's bases of all layers of one
    shape found by one batched solve (``[bases·layers·B·H, d, d]``) instead of one per layer: the
    solver's launches are paid once per prefill. The covariances and the basis choice run on
    stacks of consecutive layers alike (:data:`STACK_BYTES`). Its one host read is the token
    counts that size the segments (per prompt shape): :func:`count_tokens`, then
    :func:`compress_counted`.

    Each layer's result is yielded once its inputs are dropped from ``layers`` (the list is emptied
    as it goes), so a caller that replaces HF's tensors as results arrive frees each layer's full
    Keys once its stack is built. Methods and options that choose tokens per layer before the
    basis (token pruning, ``kv_budget``), ThinK and SparK-style solve per layer (and read the
    device more often).
    """
    return compress_counted(count_tokens(layers, config))


def compress_counted(counted: TokenCounts) -> Iterator[CompressedLayer | KeptExact]:
    """The rest of :func:`compress_layers` once :func:`count_tokens` has run: waits for the token
    counts, then queues the rest of the work without reading the device (RotateK's defaults)."""
    layers, config = counted.layers, counted.config
    spans = counted.span_tokens()
    bases: list = [None] * len(layers)
    if config.method == "rotatek" and config.token_keep >= 1.0 and config.kv_budget is None:
        bases = _per_group(
            layers, lambda p: (p.keys.shape[:2], p.keys.shape[-1], p.queries.shape, p.keys.device),
            lambda group: _solved_bases([layers[i] for i in group], [spans[i] for i in group], config))
    # stacks of layers whose span segments have one width: their span Keys and Values are gathered
    # into one [G, B, H, Sv, d|dv] buffer each, whose rows the basis choice reads as a batch and whose
    # slices each layer keeps (Values) or projects (Keys)
    for stack in _stacks(layers, lambda i: (_layer_shape(layers[i]), spans[i].positions.shape, spans[i].padded)):
        span_keys = _gathered([layers[i].keys for i in stack], [spans[i].positions for i in stack])
        span_values = _gathered([layers[i].values for i in stack], [spans[i].positions for i in stack])
        if bases[stack[0]] is not None:
            stored = _stored_bases([layers[i] for i in stack], [spans[i] for i in stack], [bases[i] for i in stack],
                                   span_keys, span_values)
            for position, index in enumerate(stack):
                spans[index] = dataclasses.replace(spans[index], basis=stored[position])
        for position, index in enumerate(stack):
            prefill, layers[index] = layers[index], None
            yield _build_layer(prefill, spans[index], config, span_keys[position], span_values[position])


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor``, copied if it is a view of a larger buffer (a slice of a stack): a cache must not
    keep bytes that its layers do not count."""
    tensor = tensor.contiguous()
    return tensor if tensor.untyped_storage().nbytes() == _nbytes(tensor) else tensor.clone()


def _gathered(tensors: list[Tensor], positions: list[Tensor]) -> Tensor:
    """Each ``[B, H, S, x]`` tensor at its ``positions`` ``[B, n]`` (:func:`_gather_positions`), into
    one ``[G, B, H, n, x]`` buffer."""
    first = tensors[0]
    out = first.new_empty(len(tensors), first.shape[0], first.shape[1], positions[0].shape[1], first.shape[-1])
    for index, (tensor, where) in enumerate(zip(tensors, positions)):
        _gather_positions(tensor, where, out=out[index])
    return out


# RotateK's candidate bases, by ``query_aware``: K-only PCA ("pca"), the query-aware basis of the
# whole window ("query"), and, for the choice between the two, the query-aware basis of the
# window's first half ("first half"), judged with K-only PCA on the second half's attention.
_BASES = {False: ("pca",), True: ("query",), "auto": ("pca", "query", "first half")}


def _solved_bases(layers: list[LayerPrefill], tokens: list[SpanTokens],
                  config: RotateKConfig) -> list[tuple[Tensor, Tensor]]:
    """Each layer's candidate bases ``[kinds, B, H, d, r]`` (:data:`_BASES`) and its span's mean
    ``[B, H, d]``, for layers of one shape: every layer's covariances solved at once."""
    kinds = _BASES[config.query_aware]
    batch = layers[0].keys.shape[0]
    fused = kernels.compress_kernels(layers[0].keys.device, config.kernel)
    if fused is not None:  # layers alike in one call, each layer's Keys read where they are
        statistics = _per_group(layers, lambda p: _layout(p.keys), lambda group: list(zip(
            *fused.span_covariances_triton([layers[i].keys for i in group], [tokens[i].selected for i in group]))))
    else:
        statistics = [reference.span_covariance(_rows([layers[i].keys for i in stack]),  # the span's tokens
                                                _rows([tokens[i].selected for i in stack]))  # selected in place
                      for stack in _stacks(layers, lambda index: _layer_shape(layers[index]))]
    covariance = torch.cat([cov for cov, _ in statistics]).unflatten(0, (len(layers), batch))  # [L, B, H, d, d]
    means = torch.cat([mean for _, mean in statistics]).unflatten(0, (len(layers), batch))  # [L, B, H, d]
    queries = torch.stack([prefill.queries for prefill in layers]).flatten(0, 1)  # [L·B, Hq, W, d]
    windows = {"query": queries, "first half": queries[:, :, :max(queries.shape[2] // 2, 1)]}

    def weighted(kind: str) -> Tensor:  # every layer's covariance of one kind: [L, B, H, d, d]
        if kind == "pca":
            return covariance
        norms = reference.query_channel_norms(windows[kind], covariance.shape[2])  # [L·B, H, d]
        return reference.weight_covariance(covariance, norms.view(*covariance.shape[:-1]))

    stacked = torch.stack([weighted(kind) for kind in kinds])  # [kinds, L, B, H, d, d]
    rotations = reference.solve_basis(stacked, config.channels_for(layers[0].keys.shape[-1]),
                                      config.solver_for(layers[0].keys.device), config.subspace_iters)
    return [(rotations[:, index], means[index]) for index in range(len(layers))]


def _stored_bases(layers: list[LayerPrefill], tokens: list[SpanTokens], bases: list[tuple[Tensor, Tensor]],
                  span_keys: Tensor, span_values: Tensor) -> list[tuple[Tensor, Tensor]]:
    """RotateK's basis as each layer of a stack stores it (``R̂`` ``[B, H, d, r]``, ``δμ`` ``[B, H, d]``),
    given the stack's gathered span ``[G, B, H, Sv, d|dv]``:
    with ``query_aware="auto"``, per row and KV head the query-aware basis where its attention error
    on the window's second half (:func:`reference.basis_attention_error`) is at most K-only PCA's."""
    rotations = torch.cat([rotation for rotation, _ in bases], dim=1)  # [kinds, G·B, H, d, r]
    chosen = rotations[0] if rotations.shape[0] == 1 else _better_basis(
        _rows([prefill.queries for prefill in layers]), span_keys.flatten(0, 1), span_values.flatten(0, 1),
        _rows([span.mask for span in tokens]) if tokens[0].padded else None, layers[0].scale, rotations)
    stored, residuals = reference.stored_basis(chosen, torch.cat([mean for _, mean in bases]), span_keys[0].dtype)
    batch = layers[0].keys.shape[0]
    # each layer its own R̂ and δμ: a view would keep the whole stack alive with any layer
    return [(rotation.clone(), residual.clone())
            for rotation, residual in zip(stored.split(batch), residuals.split(batch))]


def _better_basis(queries: Tensor, span_keys: Tensor, span_values: Tensor, mask: Optional[Tensor], scale: float,
                  rotations: Tensor) -> Tensor:
    """``rotations`` ``[3, B, H, d, r]`` (K-only PCA, query-aware, query-aware of the window's first
    half) → ``[B, H, d, r]``: per row and KV head, the query-aware basis where its first-half fit
    moves the second half's attention over the span (``span_keys``/``span_values`` ``[B, H, Sv, d|dv]``,
    ``mask`` ``[B, Sv]`` or ``None``) no more than K-only PCA does."""
    second = queries[:, :, queries.shape[2] // 2:]  # [B, Hq, W - W/2, d] (W = 1: in-sample)
    errors = reference.basis_attention_error(second, span_keys, span_values, mask, scale,
                                             rotations[0::2])  # [2, B, H]: a slice, not an index list
    query_wins = errors[1] <= errors[0]
    if logger.isEnabledFor(logging.DEBUG):  # a host read: only when asked for
        logger.debug("rotatek: query-aware basis kept for %d of %d (row, KV head)", int(query_wins.sum()),
                     query_wins.numel())
    return torch.where(query_wins[..., None, None], rotations[1], rotations[0])


def _build_layer(prefill: LayerPrefill, tokens: SpanTokens, config: RotateKConfig, span_keys: Tensor,
                 span_values: Tensor) -> CompressedLayer | KeptExact:
    """One layer's cache from its prefill, its ``tokens`` and the span's gathered Keys and Values
    ``[B, H, Sv, d|dv]`` (at ``tokens.positions``)."""
    keys, values, queries = prefill.keys, prefill.values, prefill.queries
    span_count, span_mask = tokens.count, tokens.mask
    rest_positions, rest_mask = tokens.rest_positions, tokens.rest_mask
    if config.kv_budget is not None:
        return _tiered_layer(keys, values, queries, prefill.scale, config, span_keys, span_values, span_mask,
                             tokens.per_row, rest_positions, rest_mask)

    if config.token_keep < 1.0 and span_keys.shape[2] > 0:
        scores = reference.token_scores(queries, span_keys, prefill.scale, span_mask)  # [B, H, Sv]
        kept, span_mask = reference.keep_tokens(scores, config.token_keep, span_mask, MIN_SEGMENT)
        span_keys = reference.gather_tokens(span_keys, kept)
        span_values = reference.gather_tokens(span_values, kept)

    head_dim = keys.shape[-1]
    rank = config.channels_for(head_dim)
    parts = _compress_keys(span_keys, span_mask, queries, rank, config, tokens.basis)
    layer = CompressedLayer(
        method=config.method,
        span_key_parts=parts,
        span_values=_own_storage(span_values),
        span_mask=span_mask,
        keys=_gather_positions(keys, rest_positions),
        values=_gather_positions(values, rest_positions),
        mask=rest_mask,
        head_dim=head_dim,
    )
    token_bytes = keys.shape[1] * (head_dim + values.shape[-1]) * keys.element_size()
    kept = tokens.compressed_count if span_mask is tokens.mask else int(span_mask.sum())  # after token pruning
    split = _span_split(span_count, span_count - tokens.compressed_count, kept, tokens.outside, token_bytes,
                        layer.stored_bytes)
    exact_bytes = _nbytes(keys) + _nbytes(values)  # what HF's cache would hold for the layer
    saves_nothing = rank >= head_dim and config.token_keep >= 1.0
    if layer.stored_bytes >= exact_bytes and not saves_nothing:
        exact = _span_split(span_count, span_count, 0, 0, token_bytes, span_count * token_bytes)
        return KeptExact(f"its compressed form ({layer.stored_bytes} B with the basis and masks) would not "
                         f"be smaller than the exact Keys and Values ({exact_bytes} B)", exact)
    return dataclasses.replace(layer, split=split)


def _tiered_layer(keys: Tensor, values: Tensor, queries: Tensor, scale: float, config: RotateKConfig,
                  span_keys: Tensor, span_values: Tensor, span_mask: Tensor, span_per_row: Tensor,
                  rest_positions: Tensor, rest_mask: Tensor) -> CompressedLayer | KeptExact:
    """``kv_budget``: split the span (sinks already out) into exact, rotated and dropped tiers.

    ``span_keys``/``span_values`` ``[B, H, N, d|dv]`` with ``span_mask`` ``[B, N]``: the span's
    tokens that are not sinks; ``span_per_row`` ``[B]``: span tokens per row, sinks included (the
    budget's base); ``rest_positions``/``rest_mask`` ``[B, Sf]``: the tokens outside the span and
    the sinks. The split is :func:`rotatek_compile.tiers.choose_split`'s; the exact tier joins the
    rest segment, each KV head with its own tokens (every head keeps as many per row, so the rest
    segment's mask stays per row).
    """
    span_count = int(span_per_row.sum())
    batch, heads, _, head_dim = keys.shape
    value_dim = values.shape[-1]
    element = keys.element_size()
    token_bytes = heads * (head_dim + value_dim) * element
    kept_exact = _span_split(span_count, span_count, 0, 0, token_bytes, span_count * token_bytes)
    if config.kv_budget >= 1.0:  # every span byte may stay: nothing to save
        return KeptExact("kv_budget=1 keeps every byte of the span", kept_exact)
    rank = config.channels_for(head_dim)
    outside = rest_mask.sum(dim=1).tolist()  # m_b + s_b
    layout = tiers.Layout(heads, head_dim, value_dim, rank, element, tuple(outside), MIN_SEGMENT)
    sinks = [int(n) - int(c) for n, c in zip(span_per_row.tolist(), span_mask.sum(dim=1).tolist())]
    # the budget: the tokens outside the span at full width, and β of the span's uncompressed bytes
    allowed = (sum(outside) - sum(sinks)) * token_bytes + math.floor(config.kv_budget * span_count * token_bytes)
    best, order, splits = tiers.choose_split(queries, span_keys, span_values, span_mask, scale, layout,
                                             allowed, config.query_aware)
    if best is None:
        return KeptExact(f"kv_budget={config.kv_budget:g} cannot be met: the sinks, the basis and the "
                         f"minimal segments alone take {layout.stored_bytes([0] * batch, [0] * batch)} B of the "
                         f"{allowed} B allowed", kept_exact)
    logger.debug("rotatek: kv_budget split errors %s, rotated fraction %g chosen",
                 {s.rotated_fraction: round(s.error, 5) for s in splits}, best.rotated_fraction)
    exact_width, rotated_width = max(best.exact), max(best.rotated)
    exact_index = order[:, :, :exact_width]  # [B, H, E]
    offsets = torch.tensor(best.exact, device=keys.device)[:, None, None]  # [B, 1, 1]
    rotated_index = order.gather(-1, (offsets + torch.arange(rotated_width, device=keys.device)).clamp(
        max=max(order.shape[-1] - 1, 0)).expand(-1, heads, -1)) if rotated_width else order[:, :, :0]
    exact_mask = torch.arange(exact_width, device=keys.device) < offsets[:, 0]  # [B, E]
    rotated_mask = torch.arange(rotated_width, device=keys.device) < torch.tensor(
        best.rotated, device=keys.device)[:, None]  # [B, T]

    # rest segment: the shared outside tokens and sinks, then each head's exact tier, left-aligned
    rest_keys = torch.cat([_gather_positions(keys, rest_positions),
                           reference.gather_tokens(span_keys, exact_index)], dim=2)  # [B, H, Sf + E, d]
    rest_values = torch.cat([_gather_positions(values, rest_positions),
                             reference.gather_tokens(span_values, exact_index)], dim=2)
    order_rest, mask = _compact(torch.cat([rest_mask, exact_mask], dim=1))
    rest_keys = _gather_positions(rest_keys, order_rest)
    rest_values = _gather_positions(rest_values, order_rest)

    rotated_keys = reference.gather_tokens(span_keys, rotated_index)  # [B, H, T, d]
    rotated_values = reference.gather_tokens(span_values, rotated_index)
    if rotated_width < MIN_SEGMENT:  # masked slots up to the minimal width
        pad = MIN_SEGMENT - rotated_width
        rotated_keys = torch.nn.functional.pad(rotated_keys, (0, 0, 0, pad))
        rotated_values = torch.nn.functional.pad(rotated_values, (0, 0, 0, pad))
        rotated_mask = torch.nn.functional.pad(rotated_mask, (0, pad))
    window = queries if best.query_aware else None  # the basis the split was judged with
    compressed = reference.rotatek_compress(rotated_keys, rank, rotated_mask, window,
                                            config.solver_for(keys.device), config.subspace_iters)
    layer = CompressedLayer(
        method="rotatek",
        span_key_parts=(compressed.keys.contiguous(), compressed.rotation, compressed.mean_residual),
        span_values=rotated_values.contiguous(),
        span_mask=rotated_mask,
        keys=rest_keys,
        values=rest_values,
        mask=mask,
        head_dim=head_dim,
    )
    split = _span_split(span_count, sum(sinks) + sum(best.exact), sum(best.rotated),
                        sum(outside) - sum(sinks), token_bytes, layer.stored_bytes)
    if layer.stored_bytes != best.stored_bytes:
        raise RuntimeError(f"rotatek: kv_budget layout stores {layer.stored_bytes} B, "
                           f"{best.stored_bytes} B were budgeted")
    exact_bytes = _nbytes(keys) + _nbytes(values)
    if layer.stored_bytes >= exact_bytes:
        return KeptExact(f"its tiered form ({layer.stored_bytes} B with the basis and masks) would not be "
                         f"smaller than the exact Keys and Values ({exact_bytes} B)", kept_exact)
    return dataclasses.replace(layer, split=split)


def _compress_keys(
    keys: Tensor, mask: Tensor, queries: Tensor, rank: int, config: RotateKConfig,
    basis: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, ...]:
    """What the method keeps of the span's Keys (:data:`SPAN_KEY_PARTS`); ``basis``: RotateK's
    ``(R, μ)`` when already solved (:func:`compress_layers`)."""
    if config.method == "rotatek" and basis is not None:
        rotation, mean_residual = basis
        return reference.project_span(keys, rotation).contiguous(), rotation, mean_residual
    if config.method == "rotatek":
        window = queries if config.query_aware else None
        compressed = reference.rotatek_compress(
            keys, rank, mask, window, config.solver_for(keys.device), config.subspace_iters)
        return compressed.keys.contiguous(), compressed.rotation, compressed.mean_residual
    if config.method == "think":
        channels = reference.think_channels(keys, queries, rank, mask)  # [B, H, r]
        kept = keys.gather(-1, channels[:, :, None, :].expand(-1, -1, keys.shape[2], -1))  # [B, H, Sv, r]
        return kept.contiguous(), channels.to(torch.int16)
    sparse = reference.spark_select(keys, queries, rank)
    return sparse.values.contiguous(), sparse.channels.contiguous(), sparse.fill.contiguous()
