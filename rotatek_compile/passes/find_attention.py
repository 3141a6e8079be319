"""Find the decoder self-attention sites of a Dynamo FX graph, as typed matches.

A site is an attention whose Keys and Values come from a KV-cache append (HF ``DynamicCache``)::

    keys   = cat([past_keys,   k_new], dim=-2)          # k_new: post-RoPE (and QK-norm) Keys
    values = cat([past_values, v_new], dim=-2)
    keys', values' = repeat_kv(keys), repeat_kv(values)  # optional: x[:, :, None].expand().reshape()

and one of

    sdpa:  out = scaled_dot_product_attention(q, keys', values', attn_mask=m, scale=s, ...)
    eager: out = matmul(dropout(softmax(matmul(q, keys'ᵀ) · s [+ m], fp32).to(dtype)), values')
           (or ``matmul(q, keys'ᵀ) / c``, scale ``1/c``)

where both ``keys`` and ``values`` are graph outputs (Dynamo writes them back into the cache).
An attention that does not fit is returned as a :class:`SkippedSite` with the reason; nothing
about it is changed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import re
from typing import Optional, Union

import torch
import torch.fx as fx

logger = logging.getLogger("rotatek_compile")

_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
# repeat_kv and layout no-ops between the cache append and the attention op
_PASS_THROUGH_METHODS = {"expand", "reshape", "view", "contiguous", "repeat_interleave", "to"}


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One decoder self-attention fed by a KV-cache append."""

    layer: str  # module path, e.g. "model.language_model.layers.3.self_attn"
    kind: str  # "sdpa" | "eager"
    attention: fx.Node  # node whose value is the attention output [B, Hq, L, dv]
    query: fx.Node  # post-RoPE queries [B, Hq, L, d]
    key_update: fx.Node  # cat([past_keys, new_keys], -2): a graph output
    value_update: fx.Node
    past_keys: fx.Node
    past_values: fx.Node
    new_keys: fx.Node  # [B, H, L, d]
    new_values: fx.Node
    mask: Optional[fx.Node]  # boolean or additive mask [B, 1|Hq, L, S], or None
    scale: float
    is_causal: bool
    gqa: str  # "enable_gqa" | "repeat_kv" | "none"
    rope: bool  # new_keys is `k·cos + rotate_half(k)·sin`

    @property
    def is_prefill(self) -> bool:
        """The cache was empty before this call (``past`` is the ``tensor([])`` HF starts from)."""
        return _seq_len(self.past_keys) == 0


@dataclasses.dataclass(frozen=True)
class SkippedSite:
    """An attention left exact, and why.

    ``compressible``: the layer is a decoder self-attention whose cache could be compressed, so
    leaving it exact turns compression off where a user expects it on (the backend warns);
    ``False`` for attention that never has a compressible cache (vision tower, encoder,
    cross-attention, a sliding window that keeps only the last tokens).
    """

    layer: str
    node: fx.Node
    reason: str
    compressible: bool = True


Match = Union[AttentionSite, SkippedSite]


def layer_of(node: fx.Node) -> str:
    """The innermost module path in ``nn_module_stack`` whose class name contains 'Attention'."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    for name, module_type in stack.values():
        if "attention" in getattr(module_type, "__name__", str(module_type)).lower():
            path = name
    return _clean_path(path) or node.name


# Dynamo's source of the root module: "L['self']" (a bound method), "L['args'][0]" (transformers
# >= 5.24 calls the forward through a wrapper), "L['fn'].__self__", ...
_ROOT_SOURCE = re.compile(r"^L\[[^\]]*\](\[\d+\])*(\.__self__)?\.?")


def _clean_path(path: str) -> str:
    """``"L['args'][0].model.layers[0].self_attn"`` → ``"model.layers.0.self_attn"``."""
    path = _ROOT_SOURCE.sub("", path)
    return path.replace("[", ".").replace("]", "").replace("'", "")


def example_value(node: object) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            return value
    return None


def _seq_len(node: fx.Node) -> Optional[int]:
    value = example_value(node)
    if value is None or value.dim() < 2:
        return 0 if value is not None else None
    size = value.shape[-2]
    return size if isinstance(size, int) else -1  # symbolic: a non-empty, growing cache


def _is_call(node: object, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_method(node: object, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, bool]:
    """Walk back through repeat_kv / layout no-ops; returns the source and whether any were seen."""
    seen = False
    while True:
        if _is_method(node, *_PASS_THROUGH_METHODS) or (
            _is_call(node, operator.getitem) and isinstance(node.args[0], fx.Node)
        ):
            node, seen = node.args[0], True
            continue
        return node, seen


def _cache_append(node: fx.Node) -> Optional[fx.Node]:
    """``node`` if it is ``cat([past, new], dim=-2)`` on 4-D tensors, else ``None``."""
    if not _is_call(node, torch.cat):
        return None
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    value = example_value(node)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or value is None or value.dim() != 4:
        return None
    return node if dim in (-2, 2) else None


def _is_rope(node: fx.Node) -> bool:
    """``k·cos + rotate_half(k)·sin``: an add of two muls, one of them on a cat of halves."""
    if not _is_call(node, operator.add, torch.add):
        return False
    muls = [a for a in node.args if _is_call(a, operator.mul, torch.mul)]
    return len(muls) == 2 and any(
        _is_call(arg, torch.cat) for mul in muls for arg in mul.args if isinstance(arg, fx.Node))


def graph_outputs(graph: fx.Graph) -> set[fx.Node]:
    """Every node the graph returns."""
    (output,) = graph.find_nodes(op="output")
    return set(_flatten_nodes(output.args))


def _flatten_nodes(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _match_eager(final: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node, Optional[fx.Node], float]]:
    """``matmul(dropout(softmax(matmul(q, kᵀ)·s [+ m]).to()), v)`` → (q, k, v, mask, scale)."""
    probs, values = final.args[0], final.args[1]
    chain = []  # every intermediate from the logits to the probabilities
    while _is_call(probs, torch.nn.functional.dropout) or _is_method(probs, "to"):
        chain.append(probs)
        probs = probs.args[0]
    if not _is_call(probs, torch.nn.functional.softmax, torch.softmax):
        return None
    chain.append(probs)
    logits = probs.args[0]
    mask = None
    if _is_call(logits, operator.add, torch.add):
        chain.append(logits)
        logits, mask = logits.args[0], logits.args[1]
    scale = 1.0
    if _is_call(logits, operator.mul, torch.mul) and isinstance(logits.args[1], (int, float)):
        chain.append(logits)
        logits, scale = logits.args[0], float(logits.args[1])
    elif _is_call(logits, operator.truediv, torch.div) and isinstance(logits.args[1], (int, float)):
        chain.append(logits)  # scores / sqrt(d) (GIT, BERT-style attention)
        logits, scale = logits.args[0], 1.0 / float(logits.args[1])
    if not _is_call(logits, torch.matmul):
        return None
    chain.append(logits)
    query, keys_t = logits.args
    if not (_is_method(keys_t, "transpose") and set(keys_t.args[1:]) in ({2, 3}, {-1, -2})):
        return None
    # each intermediate must feed only the next step (returned attention weights block the rewrite)
    if any(len(node.users) != 1 for node in chain):
        return None
    return query, keys_t.args[0], values, mask if isinstance(mask, fx.Node) else None, scale


def _head_dim(query: fx.Node) -> Optional[int]:
    value = example_value(query)
    return value.shape[-1] if value is not None else None


def find_attention_sites(graph: fx.Graph) -> list[Match]:
    """Every attention in ``graph``, as an :class:`AttentionSite` or a :class:`SkippedSite`."""
    outputs = graph_outputs(graph)
    matches: list[Match] = []
    for node in graph.nodes:
        if _is_call(node, *_SDPA):
            kind = "sdpa"
            query, keys, values = node.args[:3]
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            scale = node.kwargs.get("scale")
            is_causal = bool(node.kwargs.get("is_causal", False))
            enable_gqa = bool(node.kwargs.get("enable_gqa", False))
            if node.kwargs.get("dropout_p", 0.0):
                matches.append(SkippedSite(layer_of(node), node, "attention dropout is on (training)"))
                continue
        elif _is_call(node, torch.matmul) and _is_eager_final(node):
            eager = _match_eager(node)
            if eager is None:
                matches.append(SkippedSite(layer_of(node), node,
                                           "eager attention whose intermediates are reused elsewhere"))
                continue
            kind, is_causal, enable_gqa = "eager", False, False
            query, keys, values, mask, scale = eager
        else:
            continue
        layer = layer_of(node)
        key_source, key_repeated = _strip_repeat_kv(keys)
        value_source, _ = _strip_repeat_kv(values)
        key_update, value_update = _cache_append(key_source), _cache_append(value_source)
        if (key_update is None or value_update is None) and _reads_a_cache_append(key_source, outputs):
            matches.append(SkippedSite(layer, node, "multi-head latent attention: the cache keeps a latent "
                                       "that is projected into Keys after the cache read (not supported)"))
            continue
        if key_update is None or value_update is None:
            matches.append(SkippedSite(layer, node, "no KV-cache append feeds its Keys (vision tower, "
                                       "encoder, cross-attention or a cache layout the pass does not know)",
                                       compressible=False))
            continue
        if key_update not in outputs or value_update not in outputs:
            if _merges_a_cache_append(key_update, outputs):
                matches.append(SkippedSite(layer, node, "merged attention: its cached Keys are concatenated "
                                           "with another sequence's Keys (e.g. the encoder's) before one "
                                           "softmax (not supported)"))
            elif _returns_a_slice_of(key_update, outputs):
                matches.append(SkippedSite(layer, node, "the cache keeps a slice of the Keys (sliding-window "
                                           "layer)", compressible=False))
            else:
                matches.append(SkippedSite(layer, node, "the graph does not return its cache append (the "
                                           "cache is written back some other way)"))
            continue
        scale = _constant_scale(scale)
        if isinstance(mask, fx.Node) and _learned_inputs(mask):
            matches.append(SkippedSite(layer, node, "its attention mask is computed from learned weights "
                                       "(a position bias or a sparse-attention indexer), which the "
                                       "compressed cache would drop (not supported)"))
            continue
        if not isinstance(mask, (fx.Node, type(None))):
            matches.append(SkippedSite(layer, node, f"unsupported attention mask {type(mask).__name__}"))
            continue
        if scale is None:
            head_dim = _head_dim(query)
            scale = 1.0 / math.sqrt(head_dim) if head_dim else None
        if scale is None:
            matches.append(SkippedSite(layer, node, "unknown head_dim for the default scale"))
            continue
        past_keys, new_keys = key_update.args[0]
        past_values, new_values = value_update.args[0]
        if _is_cross_attention(query, new_keys):
            matches.append(SkippedSite(layer, node, CROSS_ATTENTION, compressible=False))
            continue
        gqa = "enable_gqa" if enable_gqa else ("repeat_kv" if key_repeated else "none")
        matches.append(AttentionSite(
            layer=layer, kind=kind, attention=node, query=query,
            key_update=key_update, value_update=value_update,
            past_keys=past_keys, past_values=past_values, new_keys=new_keys, new_values=new_values,
            mask=mask, scale=float(scale), is_causal=is_causal, gqa=gqa, rope=_is_rope(new_keys)))
    return matches


def _learned_inputs(node: fx.Node, limit: int = 400) -> bool:
    """A parameter of the model lies upstream of ``node``.

    HF's attention masks (causal, padding, sliding, bidirectional image blocks) are built from the
    attention mask and positions alone. A mask that reads weights carries values the decode op's
    valid/invalid mask cannot hold: a learned relative-position bias added to the logits, or the
    block selection of a sparse-attention indexer. Dynamo names parameter inputs
    ``..._parameters_<name>_``.
    """
    frontier, seen = [node], {node}
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current.op == "placeholder" and "_parameters_" in current.name:
            return True
        for parent in current.all_input_nodes:
            # values only: a shape read (``embeds.size(0)``) is no data edge; a multi-output op
            # (``topk`` of a sparse-attention indexer) is one
            if parent not in seen and _carries_values(parent):
                seen.add(parent)
                frontier.append(parent)
    return False


def _carries_values(node: fx.Node) -> bool:
    """A tensor, or a tuple of them (``topk``, ``split``, ``max(dim)``), as opposed to sizes."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, (tuple, list)):
        return any(isinstance(item, torch.Tensor) for item in value)
    return isinstance(value, torch.Tensor)


def _reads_a_cache_append(node: fx.Node, outputs: set[fx.Node], depth: int = 12) -> bool:
    """A cache append that the graph returns lies upstream of ``node`` (within ``depth`` steps):
    the Keys are computed from a cache (a latent up-projected after the read, as in MLA)."""
    frontier, seen = [node], set()
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if any(_cache_append(n) is not None and n in outputs for n in frontier):
            return True
    return False


def _merges_a_cache_append(node: fx.Node, outputs: set[fx.Node]) -> bool:
    """``node`` is ``cat([a, b], -2)`` where ``a`` (through repeat/layout ops) is a cache append the
    graph returns: the layer's own cached Keys joined with other Keys for one attention."""
    return any(_cache_append(part) in outputs for part in (_strip_repeat_kv(p)[0] for p in node.args[0])
               if isinstance(part, fx.Node))


def _returns_a_slice_of(node: fx.Node, outputs: set[fx.Node], depth: int = 4) -> bool:
    """Some graph output is ``node`` sliced along the sequence (a sliding window's cache)."""
    frontier = [node]
    for _ in range(depth):
        frontier = [user for n in frontier for user in n.users
                    if _is_call(user, operator.getitem, torch.ops.aten.slice.Tensor)
                    or _is_method(user, "contiguous", "clone")]
        if any(n in outputs for n in frontier):
            return True
    return False


_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _projection_input(node: fx.Node, depth: int = 40) -> Optional[fx.Node]:
    """The input of the ``linear`` that produced ``node``, walking back through RoPE, norms and
    reshapes along the highest-rank tensor argument (weights are lower-rank).

    GPT-2's ``Conv1D`` projects by ``addmm(bias, x.view(-1, nx), weight)``: its input is ``x``.
    """
    for _ in range(depth):
        if _is_call(node, *_LINEAR):
            return node.args[0]
        if _is_call(node, torch.addmm) and len(node.args) >= 3:
            source = node.args[1]
            while _is_method(source, "view", "reshape") or _is_call(source, torch.reshape):
                source = source.args[0]
            return source
        if _is_call(node, operator.getitem):  # a part of a fused projection: qkv.split(...)[i]
            node = node.args[0]
            continue
        candidates = [a for a in node.args if isinstance(a, fx.Node) and example_value(a) is not None]
        if not candidates:
            return None
        node = max(candidates, key=lambda a: example_value(a).dim())
    return None


def _is_cross_attention(query: fx.Node, new_keys: fx.Node) -> bool:
    """Queries and Keys projected from different hidden states (Mllama's cross-attention)."""
    query_source, key_source = _projection_input(query), _projection_input(new_keys)
    return query_source is not None and key_source is not None and query_source is not key_source


def _constant_scale(scale: object) -> Optional[float]:
    """The softmax scale as a number. Under ``dynamic=True`` Dynamo lifts the module's ``scaling``
    float to an input read by ``.item()``; it is a model constant, so its traced value is used."""
    if isinstance(scale, fx.Node):
        value = scale.meta.get("example_value")
        if isinstance(value, torch.SymFloat):
            return float(value.node.hint) if value.node.hint is not None else None
        if isinstance(value, (int, float)):
            return float(value)
        return None
    return scale


def _is_eager_final(node: fx.Node) -> bool:
    """The second matmul of eager attention: its left operand comes from a softmax."""
    probs = node.args[0]
    while _is_call(probs, torch.nn.functional.dropout) or _is_method(probs, "to"):
        probs = probs.args[0]
    return _is_call(probs, torch.nn.functional.softmax, torch.softmax)


def sites_and_skips(graph: fx.Graph) -> tuple[list[AttentionSite], list[SkippedSite]]:
    matches = find_attention_sites(graph)
    sites = [m for m in matches if isinstance(m, AttentionSite)]
    skipped = _unread_cache_appends(graph, sites, [m for m in matches if isinstance(m, SkippedSite)])
    return sites, skipped + state_space_layers(graph)


CROSS_ATTENTION = "cross-attention: its Keys come from another sequence"
_UNKNOWN_READER = ("it writes a KV cache, but no attention the pass recognises reads it (an attention "
                   "form it does not match, e.g. sink logits or a bias inside the softmax)")


def _unread_cache_appends(graph: fx.Graph, sites: list[AttentionSite],
                          skipped: list[SkippedSite]) -> list[SkippedSite]:
    """``skipped``, plus each layer that writes a KV cache (a ``cat([past, new], -2)`` the graph
    returns) with no attention of its own matched or reported: an attention form the pass does not
    know reads that cache, so the layer is left exact where it could be compressed (the backend
    warns). Appends outside any attention module count for the whole graph when it matched and
    reported nothing else.
    """
    returned = graph_outputs(graph)
    appends = [node for node in graph.nodes if node in returned and _cache_append(node) is not None]
    writers = {layer_of(node): node for node in appends if layer_of(node) != node.name}

    def same_layer(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    reported = [site.layer for site in sites] + [site.layer for site in skipped]
    unread = [SkippedSite(layer, node, _UNKNOWN_READER) for layer, node in sorted(writers.items())
              if not any(same_layer(layer, r) for r in reported)]
    if appends and not writers and not reported:
        unread = [SkippedSite(f"{appends[0].name} (outside any attention module)", appends[0], _UNKNOWN_READER)]
    return skipped + unread


# Caches of linear-attention and state-space layers (Gated DeltaNet, Mamba, short convolutions):
# HF names them conv_states / recurrent_states / ssm_states, and Dynamo's names follow
_STATE_CACHE = re.compile(r"(conv|recurrent|ssm)_states?(_|$)")
_NO_KV = ("a linear-attention or state-space layer: its cache is a fixed-size state, not Keys and "
          "Values (nothing to compress)")


def state_space_layers(graph: fx.Graph) -> list[SkippedSite]:
    """Layers whose cache is a recurrent state, reported as left exact (never compressible).

    Their state is read from a graph input (decode: written back by ``copy_``) or created in the
    graph and returned (prefill). The layer is the innermost module of the node that writes it.
    """
    found: dict[str, SkippedSite] = {}
    returned = graph_outputs(graph)
    for node in graph.nodes:
        if not _STATE_CACHE.search(node.name):
            continue
        if node.op == "placeholder":
            writers = [user for user in node.users if _is_method(user, "copy_")]
        else:
            writers = [node] if node in returned else []
        for writer in writers:
            stack = list((writer.meta.get("nn_module_stack") or {}).values())
            layer = _clean_path(stack[-1][0]) if stack else ""
            if layer and layer not in found:
                found[layer] = SkippedSite(layer, writer, _NO_KV, compressible=False)
    return list(found.values())
