"""Attention on Hugging Face's ``StaticCache``: fixed-capacity buffers written in place.

A StaticCache layer (``StaticLayer.update``, transformers 5.17 to 5.24) holds buffers of the full
capacity ``L = max_cache_len`` and writes each call's ``T`` new tokens into them in place::

    positions = arange(T) + cumulative_length                    # [T] int64
    keys.index_copy_(2, positions, k_new)                        # keys [B, H, L, d], k_new post-RoPE
    values.index_copy_(2, positions, v_new)
    out = attention(q, repeat_kv(keys), repeat_kv(values), mask)  # mask [B, 1, T, L]

The buffers are created inside the prefill graph (``zeros``) when HF initialises them lazily there,
and are graph inputs otherwise. Shapes never change from step to step: one decode graph.

Prefill (the cache holds no compressed state): attention stays exact, and each layer's buffers
are compressed right after it, inside the graph (``rotatek.compress_site``, as with a DynamicCache:
:mod:`rotatek_compile.prefill`); the first site also reads the write positions. Buffers made in
the graph are no longer returned; the runtime (:mod:`rotatek_compile.static_cache`) swaps HF's
buffers for zero-storage stand-ins.

Decode on a compressed cache: HF's buffers are no longer read or written. The layer's state comes
in as graph inputs: the compressed span, and the full-width rest in buffers of fixed capacity
``C`` with a validity mask; HF position ``p`` lives in rest slot ``p − rest_offset``::

    slot = positions - rest_offset                               # [T]
    rest_keys.index_copy_(2, slot, k_new)                        # [B, H, C, d]
    rest_values.index_copy_(2, slot, v_new)
    rest_mask.index_copy_(1, slot, new_token_mask)               # [B, C] bool
    out = rotatek.decode_attention(q, span…, rest_keys, rest_values, rest_mask)

so the decode graph keeps static shapes (and can be captured as a CUDA graph). Only one new token
per call is rewritten; a chunk on a compressed static cache is refused by the runtime.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from rotatek_compile.kernels import reference
from rotatek_compile.passes.find_attention import (
    _SDPA, SkippedSite, _constant_scale, _head_dim, _is_call, _is_eager_final, _is_method, _match_eager,
    example_value, layer_of)
from rotatek_compile.passes.rewrite import (
    SiteSlots, compress_after_attention, copy_module, has_side_effects, returned_in_place_of, state_inputs,
    token_masks, use_causal_kernel)
from rotatek_compile.passes.visual_span import find_span_masks

_INDEX_COPY = (torch.Tensor.index_copy_, torch.ops.aten.index_copy_.default)
# repeat_kv between the buffer and the attention: x[:, :, None].expand(...).reshape(...)
_REPEAT_KV_METHODS = {"expand", "reshape", "view", "contiguous", "to"}


@dataclasses.dataclass(frozen=True)
class StaticSite:
    """One decoder self-attention that reads a StaticCache layer's buffers."""

    layer: str
    attention: fx.Node  # value: [B, Hq, T, dv]
    query: fx.Node  # post-RoPE [B, Hq, T, d]
    keys: fx.Node  # HF's Key buffer [B, H, L, d]: a placeholder, or created in this graph
    values: fx.Node
    key_write: fx.Node  # keys.index_copy_(2, positions, new_keys)
    value_write: fx.Node
    positions: fx.Node  # [T] int64: where the new tokens go
    new_keys: fx.Node  # [B, H, T, d]
    new_values: fx.Node
    mask: Optional[fx.Node]  # [B|1, 1, T, L], boolean or additive
    scale: float
    prefix_read: bool = False  # causal attention over the first T positions (prefill, no padding)

    @property
    def new_tokens(self) -> Optional[int]:
        """``T``, or None where it is symbolic."""
        size = _size(self.new_keys, 2)
        return size if isinstance(size, int) else None

    @property
    def capacity(self):
        """``L``: an int, or a sympy expression when symbolic."""
        return _size(self.keys, 2)


def _attention_operands(node: fx.Node):
    """``(query, keys, values, mask, scale, is_causal)`` of an SDPA or eager attention, a skip
    reason, or None."""
    if _is_call(node, *_SDPA):
        if node.kwargs.get("dropout_p", 0.0):
            return "attention dropout is on (training)"
        query, keys, values = node.args[:3]
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        return query, keys, values, mask, node.kwargs.get("scale"), bool(node.kwargs.get("is_causal", False))
    if _is_call(node, torch.matmul) and _is_eager_final(node):
        match = _match_eager(node)
        return (*match, False) if match else "eager attention whose intermediates are reused elsewhere"
    return None


def _is_full_index(index) -> bool:
    """``x[:, :, None]``-style indices (full slices, None, Ellipsis) that select every element."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def _prefix_length(index):
    """``n`` (an int, or the node of a symbolic size) for ``x[:, :, :n]`` / ``x[:, :, :n, :]``
    (the first ``n`` cache positions), else None."""
    if not isinstance(index, tuple) or len(index) not in (3, 4) or any(i != slice(None) for i in index[:2] + index[3:]):
        return None
    positions = index[2]
    if isinstance(positions, slice) and positions.start in (None, 0) and positions.step in (None, 1) \
            and isinstance(positions.stop, (int, fx.Node)):
        return _size_of(positions.stop)
    return None


def _size_of(value):
    """An int, or the expression of a symbolic size (from a node's example value), or None."""
    if isinstance(value, fx.Node):
        value = value.meta.get("example_value")
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return value if isinstance(value, int) else None


def _buffer_behind(node: fx.Node) -> tuple[fx.Node, Optional[fx.Node], Optional[int]]:
    """Walk back through repeat_kv (and a prefix slice); returns the source, the first node after
    it (or None), and the prefix length read (None: all of it)."""
    after, prefix = None, None
    while True:
        if _is_method(node, *_REPEAT_KV_METHODS) or (
                _is_call(node, operator.getitem) and isinstance(node.args[0], fx.Node) and _is_full_index(node.args[1])):
            node, after = node.args[0], node
            continue
        if _is_call(node, operator.getitem) and prefix is None and isinstance(node.args[0], fx.Node) \
                and _prefix_length(node.args[1]) is not None:
            prefix = _prefix_length(node.args[1])
            node, after = node.args[0], node
            continue
        return node, after, prefix


def _in_place_write(buffer: fx.Node) -> Optional[fx.Node]:
    """The one ``buffer.index_copy_(2, positions, new)`` on ``buffer``, or None."""
    writes = [u for u in buffer.users if _is_method(u, "index_copy_") or _is_call(u, *_INDEX_COPY)]
    if len(writes) != 1 or writes[0].args[0] is not buffer:
        return None
    write = writes[0]
    dim = write.args[1] if len(write.args) > 1 else write.kwargs.get("dim")
    return write if dim in (2, -2) and len(write.args) == 4 else None


def _reads_shape(node: fx.Node) -> bool:
    """``x.size()`` / ``x.dim()`` / ``sym_size``: reads the buffer's shape, not its values (Dynamo
    emits them where the cache length is symbolic)."""
    return _is_method(node, "size", "dim", "stride") or _is_call(node, torch.ops.aten.sym_size.int)


def _match(node: fx.Node, order: dict[fx.Node, int]):
    """A :class:`StaticSite` for attention ``node``, a skip reason, or None (not a cache read)."""
    operands = _attention_operands(node)
    if operands is None or isinstance(operands, str):
        return operands
    query, keys, values, mask, scale, is_causal = operands
    buffers, prefixes = [], []
    for source in (keys, values):
        buffer, first_read, prefix = _buffer_behind(source)
        prefixes.append(prefix)
        write = _in_place_write(buffer)
        if write is None:
            return None  # not a static cache (DynamicCache's cat, an encoder, ...)
        allowed = {write, first_read or node} | {u for u in buffer.users if u.op == "output" or _reads_shape(u)}
        if set(buffer.users) - allowed:
            return "its static cache buffer is read elsewhere in the graph"
        if order[write] > order[node]:
            return "its static cache buffer is written after the attention"
        buffers.append((buffer, write))
    (key_buffer, key_write), (value_buffer, value_write) = buffers
    # HF's SDPA path on an empty StaticCache without padding: causal, over the first T positions
    new_tokens = _size(key_write.args[3], 2)
    prefix_read = prefixes[0] is not None
    if prefixes[0] != prefixes[1] or (prefix_read and (not is_causal or prefixes[0] != new_tokens)):
        return "attention reads part of its static cache buffer"
    if is_causal and not prefix_read:
        return "causal attention over a whole static cache buffer"
    if key_write.args[2] is not value_write.args[2]:
        return "Keys and Values are written at different positions"
    if not isinstance(mask, (fx.Node, type(None))):
        return f"unsupported attention mask {type(mask).__name__}"
    scale = _constant_scale(scale)
    if scale is None:
        head_dim = _head_dim(query)
        scale = 1.0 / head_dim ** 0.5 if head_dim else None
    if scale is None:
        return "unknown head_dim for the default scale"
    return StaticSite(layer=layer_of(node), attention=node, query=query, keys=key_buffer, values=value_buffer,
                      key_write=key_write, value_write=value_write, positions=key_write.args[2],
                      new_keys=key_write.args[3], new_values=value_write.args[3], mask=mask, scale=float(scale),
                      prefix_read=prefix_read)


def _size(node: fx.Node, dim: int):
    """Size ``dim`` of ``node``'s value: an int, a sympy expression when symbolic, or None."""
    value = example_value(node)
    return _size_of(value.shape[dim]) if value is not None and value.dim() > dim else None


def find_static_sites(graph: fx.Graph) -> tuple[list[StaticSite], list[SkippedSite]]:
    """Every attention of ``graph`` that reads a StaticCache layer, and those left exact (why).

    A layer whose buffer is a constant shorter than another layer's (a larger constant, or a
    symbolic length) is a sliding-window layer (HF sizes its buffer to the window): left exact,
    since its update switches to a rolling write once full. Symbolic lengths are all candidates:
    once requests of several cache lengths made them symbolic, each layer's buffer has a symbol of
    its own, equal or not at run time; the prefill runner keeps exact any that is shorter then.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites: list[StaticSite] = []
    skipped: list[SkippedSite] = []
    for node in graph.nodes:
        match = _match(node, order)
        if isinstance(match, StaticSite):
            sites.append(match)
        elif isinstance(match, str):
            skipped.append(SkippedSite(layer_of(node), node, match))
    kept = []
    capacities = [site.capacity for site in sites]
    longest = max((c for c in capacities if isinstance(c, int)), default=None)
    symbolic = any(c is not None and not isinstance(c, int) for c in capacities)
    for site in sites:
        if site.capacity is None or (isinstance(site.capacity, int) and (symbolic or site.capacity < longest)):
            skipped.append(SkippedSite(site.layer, site.attention, SLIDING_WINDOW, compressible=False))
        else:
            kept.append(site)
    return kept, skipped


SLIDING_WINDOW = "sliding-window layer (its static buffer is shorter than the cache)"


# --- copies that keep what Dynamo's graph tells AOTAutograd ------------------------------------


def mark_static_input(node: fx.Node) -> None:
    """Tell AOTAutograd that this input keeps its address across calls (as ``mark_static_address``)."""
    node.meta["tensor_dict"] = {**node.meta.get("tensor_dict", {}), "_dynamo_static_input_type": "unguarded"}
    if not hasattr(node, "_dynamo_source"):
        node._dynamo_source = None


# --- the rewrites ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StaticPlan:
    """A rewritten graph and where each site's tensors sit in its inputs and outputs.

    ``sites[i].past_keys_input`` / ``keys_output``: HF's Key buffer as a graph input, or as an
    output (created in the graph); -1 where it is not one.
    """

    phase: str  # "prefill" | "decode"
    module: fx.GraphModule
    sites: tuple[SiteSlots, ...]
    skipped: tuple[SkippedSite, ...]
    num_outputs: int
    buffer_lengths: tuple = ()  # prefill: each site's buffer length L, an int or a sympy expression
    size_sources: tuple[tuple, ...] = ()  # prefill: (symbol, input index, dim or None for an int input)
    new_tokens: tuple[Optional[int], ...] = ()  # decode: T of each site


def _output_node(graph: fx.Graph) -> fx.Node:
    (output,) = graph.find_nodes(op="output")
    return output


def _index_or(items: list, node: fx.Node) -> int:
    return items.index(node) if node in items else -1


def rewrite_static_prefill(gm: fx.GraphModule, query_window: int) -> Optional[StaticPlan]:
    """Prefill on a StaticCache → a copy that compresses each site's buffers right after its
    attention (see the module doc), the write positions and the image span read at the first site.

    Returns ``None`` when no attention reads a static cache.
    """
    module = copy_module(gm)
    graph = module.graph
    sites, skipped = find_static_sites(graph)
    if not sites:
        return None
    output = _output_node(graph)
    num_outputs = len(output.args[0])
    placeholders = list(graph.find_nodes(op="placeholder"))
    # at the first site: the write positions [T], then the image-merge masks [B, S]
    context = [sites[0].positions] + token_masks(graph, find_span_masks(graph), before=sites[0].attention)
    rows: dict[fx.Node, fx.Node] = {}
    slots = []
    for index, site in enumerate(sites):
        done = compress_after_attention(graph, site.attention, site.query, site.mask, site.keys, site.values,
                                        query_window, rows, context if index == 0 else [], index)
        keys_output, values_output = returned_in_place_of(graph, site.keys, site.values, done)
        slots.append(SiteSlots(
            layer=site.layer, scale=site.scale,
            past_keys_input=_index_or(placeholders, site.keys),
            past_values_input=_index_or(placeholders, site.values),
            keys_output=keys_output, values_output=values_output))
        if -1 in (max(slots[-1].past_keys_input, slots[-1].keys_output),
                  max(slots[-1].past_values_input, slots[-1].values_output)):
            raise AssertionError(f"static cache buffer of {site.layer} is neither an input nor an output")
    use_causal_kernel(graph, [site.attention for site in sites])
    graph.lint()
    module.recompile()
    return StaticPlan("prefill", module, tuple(slots), tuple(skipped), num_outputs,
                      buffer_lengths=tuple(site.capacity for site in sites), size_sources=_size_sources(graph))


def _size_sources(graph: fx.Graph) -> tuple[tuple, ...]:
    """Where the graph's inputs carry each size symbol: ``(symbol, input index, dim)``, with dim
    None for an int input."""
    sources: dict = {}
    for index, node in enumerate(graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value", node.meta.get("val"))
        sizes = [(None, value)] if isinstance(value, torch.SymInt) else (
            enumerate(value.shape) if isinstance(value, torch.Tensor) else [])
        for dim, size in sizes:
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                sources.setdefault(size.node.expr, (index, dim))
    return tuple((symbol, index, dim) for symbol, (index, dim) in sources.items())


def buffer_lengths(plan: StaticPlan, args: tuple) -> Optional[list[int]]:
    """Each site's buffer length for the inputs ``args``, before the graph runs; None where an
    input does not tell one (a size symbol no input carries)."""
    values = {symbol: args[index] if dim is None else args[index].shape[dim]
              for symbol, index, dim in plan.size_sources}
    lengths = []
    for length in plan.buffer_lengths:
        if not isinstance(length, int):
            if length is None or not length.free_symbols <= values.keys():
                return None
            length = int(length.xreplace({symbol: values[symbol] for symbol in length.free_symbols}))
        lengths.append(length)
    return lengths


def rewrite_static_decode(gm: fx.GraphModule, method: str, kernel: str,
                          compressed: set[int]) -> Optional[StaticPlan]:
    """Decode on a compressed StaticCache → a copy that attends on the state (see module doc).

    ``compressed``: input indices whose example values carry a compressed static layer; sites
    whose Key buffer is not among them stay exact. Per site the graph takes
    ``state_inputs(method)`` as new inputs, then one ``rest_offset`` per site after all of them.
    Returns ``None`` when no site is rewritten.
    """
    module = copy_module(gm)
    graph = module.graph
    sites, skipped = find_static_sites(graph)
    placeholders = list(graph.find_nodes(op="placeholder"))
    rewritable = []
    for site in sites:
        if site.keys.op == "placeholder" and placeholders.index(site.keys) in compressed and not site.prefix_read:
            rewritable.append(site)
        else:
            skipped.append(SkippedSite(site.layer, site.attention,
                                       "its cache was not filled by a rotatek-compiled prefill"))
    if not rewritable:
        return None
    first_computation = next(n for n in graph.nodes if n.op != "placeholder")
    states = []
    for site in rewritable:
        with graph.inserting_before(first_computation):
            states.append([graph.placeholder(f"rotatek_{site.keys.name}_{name}") for name in state_inputs(method)])
    with graph.inserting_before(first_computation):
        offsets = [graph.placeholder(f"rotatek_{site.keys.name}_rest_offset") for site in rewritable]
    for node in [n for state in states for n in state] + offsets:
        mark_static_input(node)
    slots = []
    for site, state, offset in zip(rewritable, states, offsets):
        _replace_static_attention(graph, site, state, offset, method, kernel)
        slots.append(SiteSlots(layer=site.layer, scale=site.scale,
                               past_keys_input=placeholders.index(site.keys),
                               past_values_input=placeholders.index(site.values),
                               keys_output=-1, values_output=-1))
    graph.eliminate_dead_code(is_impure_node=has_side_effects)
    # inputs HF mutates in place (``cumulative_length.add_``) must keep their address for CUDA graphs
    for node in graph.find_nodes(op="placeholder"):
        if any(has_side_effects(user) and user.args and user.args[0] is node for user in node.users):
            mark_static_input(node)
    graph.lint()
    module.recompile()
    return StaticPlan("decode", module, tuple(slots), tuple(skipped), len(_output_node(graph).args[0]),
                      new_tokens=tuple(site.new_tokens for site in rewritable))


def _new_token_mask(graph: fx.Graph, site: StaticSite) -> fx.Node:
    """``[B, T]`` bool: which new tokens are real, read off the last query's mask row at their
    positions (all of them without a mask)."""
    first_channel = graph.call_function(torch.select, (site.new_keys, 3, 0))  # [B, H, T]
    real = graph.call_function(torch.ones_like, (graph.call_function(torch.select, (first_channel, 1, 0)),),
                               {"dtype": torch.bool})  # [B, T]
    mask_value = example_value(site.mask)
    if mask_value is None:
        return real
    row = graph.call_function(torch.select, (site.mask, -2, -1))  # [B|1, 1|Hq, L]
    row = graph.call_function(torch.select, (row, 1, 0))  # [B|1, L]
    at_positions = graph.call_function(torch.index_select, (row, 1, site.positions))  # [B|1, T]
    if mask_value.dtype != torch.bool:  # additive: 0 where allowed, a large negative where not
        at_positions = graph.call_function(operator.gt, (at_positions, torch.finfo(mask_value.dtype).min / 2))
    return graph.call_function(torch.logical_and, (real, at_positions))


def _replace_static_attention(graph: fx.Graph, site: StaticSite, state: list[fx.Node], offset: fx.Node,
                              method: str, kernel: str) -> None:
    *span_keys, span_values, span_mask, rest_keys, rest_values, rest_mask = state
    with graph.inserting_before(site.key_write):
        slot = graph.call_function(operator.sub, (site.positions, offset))  # [T]
        # each write's result (the buffer itself) feeds the attention: the writes stay before it
        rest_keys = graph.call_method("index_copy_", (rest_keys, 2, slot, site.new_keys))
        rest_values = graph.call_method("index_copy_", (rest_values, 2, slot, site.new_values))
        rest_mask = graph.call_method("index_copy_", (rest_mask, 1, slot, _new_token_mask(graph, site)))
    with graph.inserting_before(site.attention):
        query = graph.call_function(torch.select, (site.query, 2, 0))  # [B, Hq, d]: one new token
        if method == "spark":
            out = graph.call_function(torch.ops.rotatek.sparse_decode_attention.default, (
                query, *span_keys, span_values, span_mask, rest_keys, rest_values, rest_mask, site.scale))
        else:
            if method == "think":  # channel indices → the one-hot basis the op reads, δμ = 0
                kept, channels = span_keys
                basis = graph.call_function(reference.think_basis, (channels, example_value(site.query).shape[-1]))
                span_keys = [kept] + [graph.call_function(operator.getitem, (basis, i)) for i in range(2)]
            out = graph.call_function(torch.ops.rotatek.decode_attention.default, (
                query, *span_keys, span_values, span_mask, rest_keys, rest_values, rest_mask, site.scale, kernel))
        out = graph.call_function(torch.unsqueeze, (out, 2))  # [B, Hq, 1, dv]
    site.attention.replace_all_uses_with(out)
    # HF's writes into its own buffers go: those buffers are zero-storage stand-ins now
    for write in (site.key_write, site.value_write):
        if write.users:
            write.replace_all_uses_with(write.args[0])
        graph.erase_node(write)
