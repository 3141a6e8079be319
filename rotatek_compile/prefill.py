"""Compression inside the prefill graph: each layer's cache is compressed while the graph runs.

The prefill rewrite (:func:`rotatek_compile.passes.rewrite.rewrite_prefill`) calls
``rotatek.compress_site`` right after each layer's attention, and returns its (empty) result where
the graph returned the layer's Keys and Values::

    out  = attention(q, keys, values, mask)
    done = rotatek.compress_site(keys, values, q[:, :, -W:], mask[:, 0, -1, :], spans, site)
    return (..., done, done, ...)            # was (..., keys, values, ...)

The op is opaque: Inductor runs it where it stands and frees the layer's full Keys and Values
after it, as nothing else reads them. So no point of the prefill holds every layer's full cache:
its peak holds the compressed layers so far and a few layers' full Keys and Values. The op's body
hands the tensors to the :class:`PrefillRun` that the runner made current (:func:`running`); the
runner then gives HF stand-ins (:func:`rotatek_compile.state.stand_in`) in place of ``done``.

Layers are compressed in groups, so that :func:`~rotatek_compile.state.compress_layers` batches
their work (a few launches and one host read per group, not per layer). A held layer is a copy,
since Inductor may give a buffer's memory to a later one once its last reader has run.

On a GPU the host queues the prefill graph's kernels ahead of the device, and the compression is
bound by the host's launches (thousands of small ones at a 16k-token row). Where every layer's copy
fits in :data:`HELD_BYTES`, the run cuts the layers into :data:`PIPELINED_GROUPS` groups and only
queues each group's first step as it completes (:func:`~rotatek_compile.state.count_tokens`:
sinks and segments decided on the device, token counts copied to pinned memory without waiting);
at the last site it compresses the groups in order (:func:`~rotatek_compile.state.compress_counted`),
each once its counts have arrived, so that the host may queue the first groups' compression while
the device still runs the later layers. Otherwise the groups are of equal size, as few as keep the
copies within :data:`HELD_BYTES`, each compressed as it completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from rotatek_compile.config import RotateKConfig
from rotatek_compile.state import (CompressedLayer, KeptExact, LayerPrefill, TokenCounts, _nbytes, compress_counted,
                                   count_tokens)

# Bytes of full Keys and Values held across layers, by device type, to compress them in one group.
# On a GPU each group costs a few milliseconds of host time (its launches and its host read: on an
# H200, 32 layers of one 16k-token row took 25 ms in one group, 31 ms in two), and held
# bytes add to the prefill's peak: with 9 rows of 64k tokens (2.4 GB of Keys and Values a layer)
# layers go in pairs, one copy held. None on a CPU, where a call costs its arithmetic: every layer
# is compressed alone.
HELD_BYTES = {"cuda": 4 << 30}

# Groups of a run whose every layer's copy fits in HELD_BYTES, compressed at the last site (the
# module's docstring). One: on an H200 (32 layers, one 16k-token row) more groups made the
# prefill slower, not faster (1, 2, 4, 8 groups: 595, 601, 613, 651 ms; docs/performance.md).
PIPELINED_GROUPS = 1

_THREAD = threading.local()  # .runs: the runs of the prefill graphs this thread runs now, innermost last

# (span masks of the graph, rows, positions) → (the [B, S] span or None for the prompt fallback, what it is)
SpanOf = Callable[[list[Tensor], int, int], tuple[Optional[Tensor], str]]


@dataclasses.dataclass
class _Held:
    site: int
    prefill: Optional[LayerPrefill]
    owned: bool  # the run may keep these tensors: its own copies, or buffers the graph takes as inputs


@dataclasses.dataclass
class _Counted:
    """A group whose first step is queued (:func:`~rotatek_compile.state.count_tokens`)."""

    held: list[_Held]
    left: dict[int, KeptExact]  # sites kept exact without compressing them
    # per site, what the layer's result needs once compress_counted has dropped its prefill
    inputs: dict[int, tuple[Tensor, Tensor, Tensor, bool]]
    counts: TokenCounts


class PrefillRun:
    """The compression of one run of a rewritten prefill graph, fed site by site by the graph.

    Parameters
    ----------
    config : RotateKConfig
    scales : list[float]
        Each site's softmax scale, in site order.
    span_of : SpanOf
        The image span from the graph's merge masks (reduced to ``[B, S]``), given the rows and
        positions of the prompt; asked once, at the first site.
    in_graph : list[bool], optional
        Per site, whether its Keys and Values are made in the graph (Inductor's buffers, which the
        run copies to keep), not taken as its inputs. All, by default.
    """

    def __init__(self, config: RotateKConfig, scales: list[float], span_of: SpanOf,
                 in_graph: Optional[list[bool]] = None):
        self.config, self.scales, self.span_of = config, scales, span_of
        self.in_graph = in_graph if in_graph is not None else [True] * len(scales)
        self.span: Optional[Tensor] = None  # [B, S] bool, the image tokens (None: the prompt's head)
        self.source = ""  # what the span is
        self.layers: dict[int, CompressedLayer | KeptExact] = {}
        self.exact: dict[int, tuple[Tensor, Tensor]] = {}  # layers kept exact, made in the graph: copies
        self.shapes: dict[int, tuple[torch.Size, Tensor, torch.Size, Tensor]] = {}  # Keys' and Values' (shape, like)
        self._held: list[_Held] = []  # the group being filled
        self._counted: list[_Counted] = []  # groups whose first step is queued, in site order
        self._started = False
        self._seen = 0  # sites taken
        self._group = 1  # layers compressed together
        self._pipelined = False  # groups compressed at the last site

    def take(self, site: int, keys: Tensor, values: Tensor, window: Tensor, mask_row: Optional[Tensor],
             context: list[Tensor]) -> None:
        """One site's prefill: ``keys`` ``[B, H, S, d]``, ``values`` ``[B, H, S, dv]``, ``window``
        ``[B, Hq, W, d]``, ``mask_row`` ``[B, S]`` (the last query's row of the mask) or None;
        ``context``, at the first site only: what :meth:`_start` reads."""
        if not self._started:
            self._started = True
            self._start(keys, context)
            self._group, self._pipelined = self._grouping(_nbytes(keys) + _nbytes(values), keys.device)
        self.shapes[site] = (keys.shape, keys.new_empty(0), values.shape, values.new_empty(0))
        self._seen += 1
        prefill = self._prefill(site, keys, values, window, mask_row)
        last = self._seen == len(self.scales)
        if prefill is None:  # nothing to compress
            if self.in_graph[site]:
                self.exact[site] = (keys.clone(), values.clone())
        elif last or (len(self._held) + 1 >= self._group and not self._pipelined):
            # compressed now, while the graph's buffers are alive: no copy of this one
            self._held.append(_Held(site, prefill, owned=not self.in_graph[site]))
        else:
            if self.in_graph[site]:
                prefill = dataclasses.replace(prefill, keys=keys.clone(), values=values.clone(),
                                              queries=window.clone(), valid=prefill.valid.clone())
            self._held.append(_Held(site, prefill, owned=True))
        if self._held and (last or len(self._held) >= self._group):
            self._counted.append(self._count_held())
        if last or not self._pipelined:
            self._compress_counted()

    def _start(self, keys: Tensor, context: list[Tensor]) -> None:
        """At the first site: the span, from the graph's merge masks (``context``)."""
        self.span, self.source = self.span_of(context, keys.shape[0], keys.shape[2])

    def _prefill(self, site: int, keys: Tensor, values: Tensor, window: Tensor,
                 mask_row: Optional[Tensor]) -> Optional[LayerPrefill]:
        """What :func:`compress_layers` takes of the site (None: the run compresses nothing)."""
        valid = valid_tokens(mask_row, keys)
        span = self.span if self.span is not None else prompt_head(valid, self.config.query_window)
        return LayerPrefill(keys, values, window, span, valid, self.scales[site])

    def _held_bytes(self, device: torch.device) -> float:
        """How many bytes of full Keys and Values the run may hold to compress them together."""
        return HELD_BYTES.get(device.type, 0)

    def _grouping(self, layer_bytes: int, device: torch.device) -> tuple[int, bool]:
        """Layers per group, and whether the groups are compressed at the last site: in
        :data:`PIPELINED_GROUPS` groups if every site's copy fits in :meth:`_held_bytes`; else in
        as few equal groups as hold at most that much (the last layer of a group is compressed as
        it comes), each compressed as it completes. Layers taken alike."""
        sites, limit = len(self.scales), self._held_bytes(device)
        if sites * layer_bytes <= limit:
            return math.ceil(sites / PIPELINED_GROUPS), True
        return (math.ceil(sites / math.ceil(sites * layer_bytes / limit)) if limit > 0 else 1), False

    def _left_exact(self, held: list[_Held]) -> dict[int, KeptExact]:
        """Held sites to keep exact without compressing them (none here)."""
        return {}

    def _built(self, site: int, layer: CompressedLayer) -> CompressedLayer:
        """A compressed layer as the cache keeps it."""
        return layer

    def _count_held(self) -> _Counted:
        """Queue the held group's first step (:func:`~rotatek_compile.state.count_tokens`)."""
        held, self._held = self._held, []
        left = self._left_exact(held)
        inputs = {h.site: (h.prefill.keys, h.prefill.values, h.prefill.valid, h.owned) for h in held}
        prefills = [h.prefill for h in held if h.site not in left]
        for h in held:  # compress_counted empties its list as it goes: no other reference may stay
            h.prefill = None
        return _Counted(held, left, inputs, count_tokens(prefills, self.config))

    def _compress_counted(self) -> None:
        """Compress the queued groups, in order."""
        while self._counted:
            self._compress(self._counted.pop(0))

    def _compress(self, group: _Counted) -> None:
        held, left, inputs = group.held, group.left, group.inputs
        layers = iter(compress_counted(group.counts))
        for h in held:
            layer = left[h.site] if h.site in left else next(layers)
            keys, values, valid, owned = inputs.pop(h.site)
            if isinstance(layer, KeptExact):
                if self.in_graph[h.site]:
                    self.exact[h.site] = (keys, values) if owned else (keys.clone(), values.clone())
            else:
                dropped = ((0,) * valid.shape[0] if not layer.split.dropped  # no host read when none were
                           else tuple((valid.sum(dim=1) - layer.held_tokens()).tolist()))
                layer = dataclasses.replace(layer, span_source=self.source, dropped=dropped)
                layer = self._built(h.site, layer if owned else _not_reading(layer, keys, values))
            self.layers[h.site] = layer
            del keys, values


def _not_reading(layer: CompressedLayer, keys: Tensor, values: Tensor) -> CompressedLayer:
    """``layer`` with a copy of any tensor that shares memory with the graph's ``keys`` or
    ``values`` (none does today: each is gathered or computed), which Inductor may reuse."""
    graphs = {keys.untyped_storage().data_ptr(), values.untyped_storage().data_ptr()}

    def own(tensor: Tensor) -> Tensor:
        return tensor.clone() if tensor.untyped_storage().data_ptr() in graphs else tensor

    return dataclasses.replace(layer, span_key_parts=tuple(own(t) for t in layer.span_key_parts),
                               span_values=own(layer.span_values), keys=own(layer.keys),
                               values=own(layer.values))


def _runs() -> list[PrefillRun]:
    if not hasattr(_THREAD, "runs"):
        _THREAD.runs = []
    return _THREAD.runs


def current() -> PrefillRun:
    """The run that the prefill graph running now (in this thread) feeds."""
    if not _runs():
        raise RuntimeError("rotatek: a rewritten prefill graph ran outside the backend's prefill runner")
    return _runs()[-1]


@contextlib.contextmanager
def running(run: PrefillRun) -> Iterator[PrefillRun]:
    """Make ``run`` the one that the graph's ``rotatek.compress_site`` calls feed, in this thread
    (two threads may each run a prefill)."""
    _runs().append(run)
    try:
        yield run
    finally:
        _runs().remove(run)


@torch.library.custom_op("rotatek::compress_site", mutates_args=())
def compress_site(keys: Tensor, values: Tensor, window: Tensor, mask_row: Optional[Tensor],
                  context: list[Tensor], site: int) -> Tensor:
    """Hand one layer's prefill to the current :class:`PrefillRun` (:meth:`PrefillRun.take`);
    returns an empty tensor on the Keys' device (what the graph returns in place of the layer's
    Keys and Values)."""
    current().take(site, keys, values, window, mask_row, context)
    return keys.new_empty(0)


@compress_site.register_fake
def _(keys, values, window, mask_row, context, site):
    return keys.new_empty(0)


def valid_tokens(mask: Optional[Tensor], keys: Tensor) -> Tensor:
    """``[B, S]`` bool: the tokens the prompt's last query may attend (all, without a mask).

    ``mask``: the last query's row of the attention mask, ``[B|1, S]`` (bool, or additive)."""
    batch, length = keys.shape[0], keys.shape[2]
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=keys.device)
    last = mask
    if last.dtype != torch.bool:
        last = last > torch.finfo(last.dtype).min / 2
    return last.expand(batch, length)


def prompt_head(valid: Tensor, window: int) -> Tensor:
    """Every real token except each row's last ``window`` ones."""
    from_end = valid.flip(-1).cumsum(-1).flip(-1)  # [B, S] real tokens at or after each position
    return valid & (from_end > window)
