"""The two graph rewrites: prefill compresses each layer's cache, decode attends on the result.

Prefill (the cache was empty): attention stays exact, and each layer's Keys and Values are
compressed right after it, inside the graph (:mod:`rotatek_compile.prefill`)::

    out  = sdpa(q, keys, values, ...)
    done = rotatek.compress_site(keys, values, q[:, :, -W:], mask[:, 0, -1, :], spans, site)
    return (..., keys, values, ...)   →   return (..., done, done, ...)

where ``spans`` (the first site only) are the image-merge masks reduced to ``[B, S]``.

Decode (new tokens on a compressed cache: one per step, or a chunk of ``T``)::

    keys   = cat([past_keys, k_new], -2)            rest_keys   = cat([rest_keys, k_new], -2)
    values = cat([past_values, v_new], -2)    →     rest_values = cat([rest_values, v_new], -2)
    out = sdpa(q, keys, values, ...)                out = rotatek.decode_attention(q, span…, rest…)

with the layer's compressed state as new graph inputs and the grown rest segment as new outputs.
The outputs that Dynamo writes back to HF's cache (``keys``/``values``) become the past stand-ins
(graph inputs, free to return); the runtime swaps them for grown stand-ins.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

import rotatek_compile.prefill  # noqa: F401  (registers torch.ops.rotatek.compress_site)
from rotatek_compile.kernels import reference
from rotatek_compile.ops import MASK_BUILDERS
from rotatek_compile.passes.find_attention import (
    _SDPA, AttentionSite, SkippedSite, _is_call, example_value, graph_outputs, sites_and_skips)
from rotatek_compile.passes.visual_span import find_merges, find_span_masks
from rotatek_compile.state import SPAN_KEY_PARTS

logger = logging.getLogger("rotatek_compile")

STATE_OUTPUTS = ("rest_keys", "rest_values", "rest_mask")


def state_inputs(method: str) -> tuple[str, ...]:
    """Inputs the decode graph takes per site, in order (see ``CompressedLayer``)."""
    return SPAN_KEY_PARTS[method] + ("span_values", "span_mask") + STATE_OUTPUTS


@dataclasses.dataclass(frozen=True)
class SiteSlots:
    """Where one site's tensors sit in the compiled graph's inputs and outputs."""

    layer: str
    scale: float
    past_keys_input: int  # index of HF's past Keys among the graph inputs
    past_values_input: int
    keys_output: int  # index of the Keys Dynamo writes back into HF's cache
    values_output: int
    mask_input: int = -1  # decode: the attention mask when it is a graph input (built elsewhere)


@dataclasses.dataclass(frozen=True)
class RewrittenGraph:
    phase: str  # "prefill" | "decode" | "merge"
    module: fx.GraphModule
    sites: tuple[SiteSlots, ...]
    skipped: tuple[SkippedSite, ...]
    num_outputs: int  # outputs of the original graph (the rest are added)
    span_outputs: tuple[int, ...] = ()  # merge: image-merge masks
    merge_outputs: tuple[int, ...] = ()  # merge: the merged embeddings each mask belongs to


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule over a copy of ``gm``'s graph (Dynamo keeps using its own graph), with
    Dynamo's metadata.

    AOTAutograd reads the graph's ``dynamo_compile_id``, ``_param_name_to_source`` and each
    placeholder's ``_dynamo_source`` to tell which inputs keep their address (parameters, buffers
    marked with ``mark_static_address``); without them CUDA graphs (``mode="reduce-overhead"``)
    would copy every weight into their own memory on each replay.
    """
    module = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    module.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        module._param_name_to_source = gm._param_name_to_source
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), module.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return module


def _output_node(graph: fx.Graph) -> fx.Node:
    (output,) = graph.find_nodes(op="output")
    return output


def _output_index(graph: fx.Graph, node: fx.Node) -> int:
    return list(_output_node(graph).args[0]).index(node)


def _append_outputs(graph: fx.Graph, nodes: list[fx.Node]) -> list[int]:
    output = _output_node(graph)
    values = list(output.args[0])
    first = len(values)
    output.args = (tuple(values + nodes),)
    return list(range(first, first + len(nodes)))


def use_causal_kernel(graph: fx.Graph, attentions: list[fx.Node]) -> int:
    """Prefill SDPA calls with a boolean mask → ``rotatek.prefill_attention``, which runs SDPA with
    ``is_causal=True`` (the flash kernel) whenever the mask is exactly causal. Returns the count.

    Per mask, once, before its first use (``m``: ``[B, 1|Hq, L, S]`` bool)::

        causal = (m == (arange(S)[None, :] <= arange(L)[:, None])).all()     # top-left causal (as int8)
        sdpa(q, k, v, attn_mask=m, scale=s)  →  rotatek.prefill_attention(q, k, v, m, causal, s, gqa)

    Keys and Values that ``repeat_kv`` expanded to ``Hq`` heads are read before the expansion,
    with ``enable_gqa`` (:func:`_unrepeated`).

    Left alone: additive masks, dropout, ``is_causal`` already set, no mask.

    Layers whose masks are the same prefix slice of one mask share one mask node
    (:func:`_shared_mask`). Where the graph computes the mask from its inputs, the op gets that
    computation instead of the mask (``rotatek.prefill_attention_lazy_mask``,
    :func:`_mask_builder`) and builds it only for a prompt that is not causal: Inductor keeps no
    ``[B, 1, L, S]`` mask at all (4.3 GB at 64k tokens); the causal check reads the mask's
    expression without storing it. Any other mask is materialised once for every layer
    (:func:`_materialised_once`).
    """
    flags: dict[fx.Node, fx.Node] = {}
    shared: dict[tuple, fx.Node] = {}
    mask_inputs: dict[fx.Node, object] = {}  # mask → a node holding it, or (builder key, its inputs)
    private: list[tuple[fx.Node, list[fx.Node]]] = []  # masks the ops build themselves
    count = 0
    for node in attentions:
        if not _is_call(node, *_SDPA) or len(node.args) != 3:
            continue
        mask, kwargs = _shared_mask(node.kwargs.get("attn_mask"), shared), node.kwargs
        value = example_value(mask) if isinstance(mask, fx.Node) else None
        if value is None or value.dtype != torch.bool or kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal"):
            continue
        if mask not in mask_inputs:
            nodes = _mask_computation(mask)
            built = _mask_builder(mask, nodes) if nodes else None
            mask_inputs[mask] = built or _materialised_once(graph, mask)
            if built:
                private.append((mask, nodes))
        query, keys, values = node.args
        gqa = bool(kwargs.get("enable_gqa", False))
        grouped = _unrepeated(keys, query), _unrepeated(values, query)
        if None not in grouped:  # SDPA groups the heads itself: no [B, Hq, S, d] copies of K and V
            (keys, values), gqa = grouped, True
        if mask not in flags:
            with graph.inserting_before(node):
                rows = graph.call_method("size", (mask, -2))
                columns = graph.call_method("size", (mask, -1))
                row = graph.call_function(torch.arange, (rows,), {"device": value.device})
                column = graph.call_function(torch.arange, (columns,), {"device": value.device})
                reference_mask = graph.call_function(
                    operator.le, (graph.call_method("unsqueeze", (column, 0)), graph.call_method("unsqueeze", (row, 1))))
                # as int8: Inductor's range analysis of torch 2.11 fails on == between booleans
                difference = graph.call_function(torch.sub, (
                    graph.call_method("to", (mask, torch.int8)), graph.call_method("to", (reference_mask, torch.int8))))
                largest = graph.call_function(torch.amax, (graph.call_function(torch.abs, (difference,)),))
                flags[mask] = graph.call_function(operator.eq, (largest, 0))  # [] bool
        scale = kwargs.get("scale")
        if scale is None:
            scale = example_value(query).shape[-1] ** -0.5
        mask_input = mask_inputs[mask]
        with graph.inserting_before(node):
            if isinstance(mask_input, fx.Node):
                fast = graph.call_function(torch.ops.rotatek.prefill_attention.default,
                                           (query, keys, values, mask_input, flags[mask], float(scale), gqa))
            else:
                key, tensors, sizes = mask_input
                fast = graph.call_function(torch.ops.rotatek.prefill_attention_lazy_mask.default,
                                           (query, keys, values, flags[mask], float(scale), gqa, key, tensors, sizes))
        fast.meta.update(node.meta)
        node.replace_all_uses_with(fast)
        graph.erase_node(node)
        count += 1
    for mask, nodes in private:
        _read_privately(graph, mask, nodes)
    return count


# repeat_kv: x[:, :, None, :, :].expand(B, H, n, S, d).reshape(B, H * n, S, d), or repeat_interleave
_REPEAT_METHODS = ("expand", "reshape", "view", "contiguous", "repeat_interleave")


def _unrepeated(node: fx.Node, query: fx.Node) -> Optional[fx.Node]:
    """The ``[B, H, S, d]`` Keys (or Values) that ``node`` repeats to ``Hq`` heads, or ``None``.

    HF's ``repeat_kv`` gives query head ``h`` the KV head ``h // n``, as SDPA's ``enable_gqa``
    does, so the attention can read the source. Only a chain of repeat/layout ops qualifies, with
    the source's batch, length, width and dtype those of ``node`` and ``H`` dividing ``Hq``.
    """
    source = node
    while (isinstance(source, fx.Node) and source.op == "call_method" and source.target in _REPEAT_METHODS) or (
            _is_call(source, operator.getitem) and _inserts_an_axis(source.args[1])):
        source = source.args[0]
    if source is node or not isinstance(source, fx.Node):
        return None
    repeated, original, queries = example_value(node), example_value(source), example_value(query)
    if repeated is None or original is None or queries is None or original.dim() != 4 or repeated.dim() != 4:
        return None
    same = [str(original.shape[i]) == str(repeated.shape[i]) for i in (0, 2, 3)]
    heads, query_heads = original.shape[1], queries.shape[1]
    if not all(same) or original.dtype != repeated.dtype or str(repeated.shape[1]) != str(query_heads):
        return None
    if not isinstance(heads, int) or not isinstance(query_heads, int) or query_heads % heads:
        return None
    return source


def _inserts_an_axis(index) -> bool:
    """``tensor[index]`` only adds a new axis (``x[:, :, None, :, :]``)."""
    parts = index if isinstance(index, tuple) else (index,)
    return None in parts and all(p is None or p is Ellipsis or p == slice(None) for p in parts)


def _shared_mask(mask, shared: dict[tuple, fx.Node]):
    """The first mask seen that equals ``mask``: ``m[..., :L, :S]`` prefix slices of one base mask
    with the same (symbolic) shape are equal. HF slices the model's mask to each layer's key length
    (``attention_mask[:, :, :, :key.shape[-2]]``), one slice node per layer."""
    if not isinstance(mask, fx.Node):
        return mask
    base = mask
    while _is_call(base, operator.getitem) and _is_prefix_index(base.args[1]):
        base = base.args[0]
    value = example_value(mask)
    key = (base, tuple(str(size) for size in value.shape) if value is not None else id(mask))
    return shared.setdefault(key, mask)


def _mask_computation(mask: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes that compute ``mask`` from the graph's inputs (placeholders included), in graph
    order; ``None`` where the computation reads a module attribute, has side effects, runs inside
    ``vmap`` (transformers' mask functions may), or reads a tensor that something in the graph
    writes in place (a replay would not see the same values)."""
    nodes, stack = {}, [mask]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        if node.op not in ("placeholder", "call_function", "call_method") or (
                node.op != "placeholder" and has_side_effects(node)):
            return None
        if "functorch" in (getattr(node.target, "__module__", None) or ""):
            return None  # vmap's batch-dim plumbing: it needs the vmap levels set around it
        if any(_writes_in_place(user, node) for user in node.users):
            return None
        nodes[node] = None
        stack.extend(node.all_input_nodes)
    order = {node: i for i, node in enumerate(mask.graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def _writes_in_place(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` writes ``node``'s tensor in place (``node.add_(x)``, ``out=node``,
    ``node[i] = x``), not merely reads it next to a write elsewhere (``cache.index_copy_(2, node, k)``)."""
    if user.op == "output" or not has_side_effects(user):
        return False
    if user.kwargs.get("out") is node:
        return True
    if isinstance(user.target, torch._ops.OpOverload):
        written = [a.name for a in user.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        arguments = dict(zip([a.name for a in user.target._schema.arguments], user.args)) | dict(user.kwargs)
        return any(arguments.get(name) is node for name in written)
    return bool(user.args) and user.args[0] is node


def _mask_builder(mask: fx.Node, nodes: list[fx.Node]) -> Optional[tuple[str, list[fx.Node], list[fx.Node]]]:
    """``mask``'s computation (:func:`_mask_computation`) cut out as a module and registered in
    ``rotatek_compile.ops.MASK_BUILDERS``: ``(key, tensor inputs, size inputs)``, or None where
    it reads anything but integer or boolean tensors (token ids, positions, padding) and sizes.

    The key hashes the module's code, so an Inductor graph loaded from its cache in another
    process finds the builder that the same rewrite registered there.
    """
    inputs = [node for node in nodes if node.op == "placeholder"]
    tensors = [node for node in inputs if isinstance(example_value(node), torch.Tensor)]
    sizes = [node for node in inputs if isinstance(node.meta.get("example_value"), (int, torch.SymInt))]
    if len(tensors) + len(sizes) != len(inputs) or any(example_value(t).is_floating_point() for t in tensors):
        return None  # a mask from activations or weights: replaying it would repeat model work
    builder = fx.Graph()
    inputs = {node: builder.placeholder(node.name) for node in tensors + sizes}
    builder.output(_copy_computation(builder, nodes, inputs)[mask])
    module = fx.GraphModule(torch.nn.Module(), builder)
    key = hashlib.sha256(module.code.encode()).hexdigest()[:16]
    MASK_BUILDERS.setdefault(key, module)
    return key, tensors, sizes


def _read_privately(graph: fx.Graph, mask: fx.Node, nodes: list[fx.Node]) -> None:
    """Give every remaining reader of ``mask`` (the causal check, the returned mask row) its own
    copy of the computation, placed before it. A pointwise expression with one reader is computed
    inside that reader's kernel; shared by two, Inductor stored the whole ``[B, 1, L, S]`` mask
    (17 GB at 128k tokens) although no attention read it."""
    inputs = {node: node for node in nodes if node.op == "placeholder"}
    for user in list(mask.users):
        with graph.inserting_before(user):
            user.replace_input_with(mask, _copy_computation(graph, nodes, inputs)[mask])


def _copy_computation(graph: fx.Graph, nodes: list[fx.Node], inputs: dict[fx.Node, fx.Node]) -> dict:
    """Copies of ``nodes`` (a computation in graph order, :func:`_mask_computation`) inserted into
    ``graph`` at its insertion point, reading ``inputs[p]`` for each placeholder ``p``; every
    original node → its copy."""
    copied = dict(inputs)
    for node in nodes:
        if node.op != "placeholder":
            copied[node] = graph.node_copy(node, copied.__getitem__)
    return copied


def _materialised_once(graph: fx.Graph, mask: fx.Node) -> fx.Node:
    """``mask`` read from one buffer: ``rotatek.kept_copy`` of it (of what it expands, for an
    ``expand`` view: the batch and head axes stay broadcast), right where it is defined.

    The attention op is opaque, so Inductor realises each input it gets; given a mask that is
    still a pointwise expression (HF builds it from ``arange`` comparisons under compile), it made
    one ``[B, 1, L, S]`` copy per layer and computed them all in one fused kernel at the start of
    the graph: +0.27 GB per layer at 16k tokens, alive until each layer's attention ran.
    """
    source = mask.args[0] if mask.op == "call_method" and mask.target == "expand" else mask
    with graph.inserting_after(mask):
        kept = graph.call_function(torch.ops.rotatek.kept_copy.default, (source,))
    kept.meta["example_value"] = example_value(source)
    if source is mask or _same_shape(source, mask):  # an expand that changes nothing
        return kept
    with graph.inserting_after(kept):
        view = graph.call_method("expand", (kept, *mask.args[1:]), dict(mask.kwargs))
    view.meta["example_value"] = example_value(mask)
    return view


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    shapes = [getattr(example_value(n), "shape", None) for n in (a, b)]
    return None not in shapes and [str(x) for x in shapes[0]] == [str(x) for x in shapes[1]]


def _is_prefix_index(index) -> bool:
    """``index`` (of ``tensor[index]``) only keeps a leading part of each dimension."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if part is Ellipsis:
            continue
        if not isinstance(part, slice) or part.start not in (None, 0) or part.step not in (None, 1):
            return False
    return True


def _is_placeholder(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


def _input_index(graph: fx.Graph, node: fx.Node) -> int:
    return list(graph.find_nodes(op="placeholder")).index(node)


def rewrite_prefill(gm: fx.GraphModule, query_window: int) -> Optional[RewrittenGraph]:
    """Prefill graph → a copy that compresses each site's Keys and Values right after its attention
    (``rotatek.compress_site``, see the module doc) and no longer returns them.

    Returns ``None`` when the graph has no prefill site.
    """
    module = copy_module(gm)
    graph = module.graph
    sites, skipped = sites_and_skips(graph)
    sites = [s for s in sites if s.is_prefill]
    if not sites:
        return None
    num_outputs = len(_output_node(graph).args[0])
    context = token_masks(graph, find_span_masks(graph), before=sites[0].attention)
    rows: dict[fx.Node, fx.Node] = {}  # mask → the copy of its last row, made at its first site
    slots = []
    for index, site in enumerate(sites):
        done = compress_after_attention(graph, site.attention, site.query, site.mask, site.key_update,
                                        site.value_update, query_window, rows, context if index == 0 else [], index)
        keys_output, values_output = returned_in_place_of(graph, site.key_update, site.value_update, done)
        slots.append(SiteSlots(layer=site.layer, scale=site.scale, past_keys_input=-1, past_values_input=-1,
                               keys_output=keys_output, values_output=values_output))
    use_causal_kernel(graph, [site.attention for site in sites])
    graph.lint()
    module.recompile()
    return RewrittenGraph("prefill", module, tuple(slots), tuple(skipped), num_outputs)


def compress_after_attention(graph: fx.Graph, attention: fx.Node, query: fx.Node, mask: Optional[fx.Node],
                             keys: fx.Node, values: fx.Node, query_window: int, rows: dict[fx.Node, fx.Node],
                             context: list[fx.Node], site: int) -> fx.Node:
    """``rotatek.compress_site`` of one site, right after its attention and the copies it reads
    (:func:`window_and_mask_row`; ``rows`` maps each mask to its row's copy, made at its first site).
    Returns the op's node."""
    window, row = window_and_mask_row(graph, attention, query, mask, query_window, rows)
    if row is not None:
        rows[mask] = row
    with graph.inserting_after(row if row is not None else window):
        return graph.call_function(torch.ops.rotatek.compress_site.default,
                                   (keys, values, window, rows.get(mask), context, site))


def returned_in_place_of(graph: fx.Graph, keys: fx.Node, values: fx.Node, done: fx.Node) -> tuple[int, int]:
    """Return ``done`` where the graph returned ``keys`` and ``values``: the indices of those
    outputs (-1 where one was not returned). A ``done`` returned nowhere else is appended (the
    graph's buffers are its inputs): a result no one reads would be removed as dead code."""
    output = _output_node(graph)
    returned = list(output.args[0])
    indices = []
    for node in (keys, values):
        index = returned.index(node) if node in returned else -1
        if index >= 0:
            returned[index] = done
        elif node is keys and node is values:  # Keys that are also the Values
            index = indices[0]
        indices.append(index)
    if done not in returned:
        returned.append(done)
    output.args = (tuple(returned),)
    return indices[0], indices[1]


def token_masks(graph: fx.Graph, masks: list[fx.Node], before: fx.Node) -> list[fx.Node]:
    """Each ``[B, S, ...]`` merge mask that the graph computes before ``before``, reduced to
    ``[B, S]`` (``any`` over its trailing dimensions) right after it."""
    order = {node: position for position, node in enumerate(graph.nodes)}
    reduced = []
    for mask in masks:
        if order[mask] > order[before]:
            logger.info("rotatek: an image merge after the first attention is not read for the span")
            continue
        node = mask
        for _ in range(example_value(mask).dim() - 2):
            with graph.inserting_after(node):
                node = graph.call_function(torch.any, (node, -1))
        reduced.append(node)
    return reduced


def window_and_mask_row(graph: fx.Graph, attention: fx.Node, query: fx.Node, mask: Optional[fx.Node],
                        window: int, done: dict) -> tuple[fx.Node, Optional[fx.Node]]:
    """Copies of ``query[:, :, -W:]`` and of the mask's last row (``None`` if ``mask`` is in ``done``
    or None), taken right after ``attention`` (``rotatek.kept_copy``: Inductor keeps them there),
    so that no layer's whole ``[B, Hq, L, d]`` query stays alive past its attention.
    """
    with graph.inserting_after(attention):
        copy_window = graph.call_function(torch.ops.rotatek.kept_copy.default, (None,))  # [B, Hq, W, d]
    with graph.inserting_before(copy_window):
        sliced = graph.call_function(torch.ops.aten.slice.Tensor, (query, 2, -window))
    copy_window.args = (sliced,)
    if mask is None or mask in done:
        return copy_window, None
    with graph.inserting_after(copy_window):
        copy_row = graph.call_function(torch.ops.rotatek.kept_copy.default, (None,))  # [B, S]
    with graph.inserting_before(copy_row):
        row = graph.call_function(torch.select, (mask, -2, -1))  # the last query's row: [B, 1|Hq, S]
        row = graph.call_function(torch.select, (row, 1, 0))  # [B, S]: every real token (causal)
    copy_row.args = (row,)
    return copy_window, copy_row


def rewrite_merge(gm: fx.GraphModule) -> Optional[RewrittenGraph]:
    """A graph that only merges image features (no attention) → a copy that also returns the masks.

    The runtime tags each returned merged-embeddings tensor with its mask, for the decoder graph
    that receives it. Returns ``None`` when no merge result is a graph output.
    """
    module = copy_module(gm)
    graph = module.graph
    returned = graph_outputs(graph)
    merges = [(merged, mask) for merged, mask in find_merges(graph) if merged in returned]
    if not merges:
        return None
    num_outputs = len(_output_node(graph).args[0])
    merge_outputs = tuple(_output_index(graph, merged) for merged, _ in merges)
    span_outputs = tuple(_append_outputs(graph, [mask for _, mask in merges]))
    graph.lint()
    module.recompile()
    return RewrittenGraph("merge", module, (), (), num_outputs, span_outputs, merge_outputs)


def rewrite_decode(gm: fx.GraphModule, method: str, kernel: str,
                   compressed: set[int]) -> Optional[RewrittenGraph]:
    """Decode graph → a copy whose attention runs on the compressed cache of each site.

    ``compressed`` holds the input indices whose example values carry a compressed layer; sites
    whose past Keys are not among them are left exact (reported as skipped).
    Returns ``None`` when no site is rewritten.
    """
    module = copy_module(gm)
    graph = module.graph
    sites, skipped = sites_and_skips(graph)
    skipped = list(skipped)
    rewritable: list[AttentionSite] = []
    for site in sites:
        if site.is_prefill:
            continue
        if site.past_keys.op != "placeholder" or _input_index(graph, site.past_keys) not in compressed:
            skipped.append(SkippedSite(site.layer, site.attention,
                                       "its cache was not filled by a rotatek-compiled prefill"))
            continue
        rewritable.append(site)
    if not rewritable:
        return None
    output = _output_node(graph)
    num_outputs = len(output.args[0])
    first_computation = next(n for n in graph.nodes if n.op != "placeholder")
    slots = []
    for site in rewritable:
        with graph.inserting_before(first_computation):  # new inputs go last, in order
            state = [graph.placeholder(f"rotatek_{site.key_update.name}_{name}") for name in state_inputs(method)]
        for node in state:
            node._dynamo_source = None  # an input of ours, not Dynamo's (AOTAutograd reads the field)
        new_rest = _replace_attention(graph, site, state, method, kernel)
        slots.append(SiteSlots(
            layer=site.layer, scale=site.scale,
            past_keys_input=_input_index(graph, site.past_keys),
            past_values_input=_input_index(graph, site.past_values),
            keys_output=_output_index(graph, site.key_update),
            values_output=_output_index(graph, site.value_update),
            mask_input=_input_index(graph, site.mask) if _is_placeholder(site.mask) else -1))
        # HF's cache gets the past stand-ins back; the runtime grows them
        _replace_output(graph, site.key_update, site.past_keys)
        _replace_output(graph, site.value_update, site.past_values)
        _append_outputs(graph, new_rest)
    graph.eliminate_dead_code(is_impure_node=has_side_effects)
    graph.lint()
    module.recompile()
    return RewrittenGraph("decode", module, tuple(slots), tuple(skipped), num_outputs)


def has_side_effects(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its result.

    FX's own test (``Node.is_impure``) treats every ``call_method`` as pure, but Dynamo graphs
    mutate tensors in place through methods and functions whose result is unused: MoE routing
    (``scatter_``), linear-attention and short-conv cache state (``copy_``), ``x[i] = y``
    (``operator.setitem``), ``out=`` variants. PyTorch names in-place ops with a trailing ``_``.
    """
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    if "out" in node.kwargs or node.target is operator.setitem:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if getattr(node.target, "__module__", None) == "_operator":  # and_, or_: pure; iand, ior: in place
        return name in _IN_PLACE_OPERATORS or node.target is operator.delitem
    return name.endswith("_") and not name.endswith("__")


_IN_PLACE_OPERATORS = {"iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "ior",
                       "ipow", "irshift", "isub", "itruediv", "ixor"}


def _new_token_mask(graph: fx.Graph, site: AttentionSite) -> fx.Node:
    """``[B, L]`` bool: which of the ``L`` new tokens are real.

    Without a mask, all. With one, the last query's row over the last ``L`` key positions (the
    new tokens; under a causal mask that query sees every real one): a second prompt turn may be
    padded inside the sequence, and those zeros must hold.
    """
    first_channel = graph.call_function(torch.select, (site.new_keys, 3, 0))  # [B, H, L]
    first_head = graph.call_function(torch.select, (first_channel, 1, 0))  # [B, L]
    real = graph.call_function(torch.ones_like, (first_head,), {"dtype": torch.bool})
    mask_value = example_value(site.mask)
    if mask_value is None:
        return real
    length = example_value(site.new_keys).shape[2]
    if not isinstance(length, int):
        length = graph.call_function(torch.ops.aten.sym_size.int, (site.new_keys, 2))
    start = graph.call_function(operator.neg, (length,))
    row = graph.call_function(torch.select, (site.mask, -2, -1))  # [B|1, 1|Hq, S]
    row = graph.call_function(torch.select, (row, 1, 0))  # [B|1, S]
    tail = graph.call_function(torch.ops.aten.slice.Tensor, (row, 1, start))  # [B|1, L]
    if mask_value.dtype != torch.bool:  # additive: 0 where allowed, a large negative where not
        tail = graph.call_function(operator.gt, (tail, torch.finfo(mask_value.dtype).min / 2))
    return graph.call_function(torch.logical_and, (real, tail))


def _is_one(length) -> bool:
    """A query length known to be 1 (a symbolic length may be anything: it takes the chunk form)."""
    return isinstance(length, int) and length == 1


def _replace_output(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    output = _output_node(graph)
    output.args = (tuple(new if value is old else value for value in output.args[0]),)


def _replace_attention(graph: fx.Graph, site: AttentionSite, state: list[fx.Node],
                       method: str, kernel: str) -> list[fx.Node]:
    """Insert the decode op for ``site``; returns the grown rest segment (keys, values, mask)."""
    *span_keys, span_values, span_mask, rest_keys, rest_values, rest_mask = state
    with graph.inserting_before(site.attention):
        keys = graph.call_function(torch.cat, ([rest_keys, site.new_keys],), {"dim": -2})
        values = graph.call_function(torch.cat, ([rest_values, site.new_values],), {"dim": -2})
        mask = graph.call_function(torch.cat, ([rest_mask, _new_token_mask(graph, site)],), {"dim": -1})
        # one new token: the op's one-token form [B, Hq, d] (the Triton kernel's); a chunk of
        # T tokens (teacher forcing, a second prompt turn): [B, Hq, T, d], causal inside the op
        query_value = example_value(site.query)
        one_token = query_value is not None and _is_one(query_value.shape[2])
        query = graph.call_function(torch.select, (site.query, 2, 0)) if one_token else site.query
        if method == "spark":
            out = graph.call_function(torch.ops.rotatek.sparse_decode_attention.default, (
                query, *span_keys, span_values, span_mask, keys, values, mask, site.scale))
        else:
            if method == "think":  # channel indices → the one-hot basis the op reads, δμ = 0
                kept, channels = span_keys
                basis = graph.call_function(reference.think_basis, (channels, query_value.shape[-1]))
                span_keys = [kept] + [graph.call_function(operator.getitem, (basis, i)) for i in range(2)]
            out = graph.call_function(torch.ops.rotatek.decode_attention.default, (
                query, *span_keys, span_values, span_mask, keys, values, mask, site.scale, kernel))
        if one_token:
            out = graph.call_function(torch.unsqueeze, (out, 2))  # [B, Hq, 1, dv]
    site.attention.replace_all_uses_with(out)
    return [keys, values, mask]
