"""Find where a VLM merges image features into the text embeddings: that mask is the span.

HF VLMs write the vision tower's output into the token embeddings at the image-token positions::

    embeds = embeds.masked_scatter(mask, image_features)     # mask [B, S, 1|D] bool
    embeds[mask] = image_features  /  index_put(embeds, (mask,), features)    # mask [B, S] bool

where ``mask`` derives from ``input_ids == image_token_id``. Under ``generate()`` Dynamo breaks the
graph at HF's ``Tensor.item()`` check. In most VLMs the break comes before the merge, which stays
in the decoder graph with the mask as an input. Where the merge lands in a graph of its own
(Idefics3), the backend tags the merged embeddings it returns with the mask, and the decoder
graph, which receives that very tensor as an input, reads the tag.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from rotatek_compile.passes.find_attention import example_value

_MASKED_SCATTER = ("masked_scatter", "masked_scatter_")
_INDEX_PUT = (torch.Tensor.index_put, torch.Tensor.index_put_, torch.index_put,
              torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)


def _bool_mask(node: object) -> bool:
    value = example_value(node)
    return value is not None and value.dtype == torch.bool and value.dim() >= 2


def find_span_masks(graph: fx.Graph) -> list[fx.Node]:
    """Boolean ``[B, S, ...]`` masks of every image/video feature merge in ``graph``."""
    masks: list[fx.Node] = []
    for _, mask in find_merges(graph):
        if mask not in masks:
            masks.append(mask)
    return masks


def find_merges(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(merged embeddings, boolean mask)`` of every image/video feature merge in ``graph``."""
    merges: list[tuple[fx.Node, fx.Node]] = []
    for node in graph.nodes:
        if node.op == "call_method" and node.target in _MASKED_SCATTER:
            mask = node.args[1]
        elif node.op == "call_function" and node.target is torch.Tensor.masked_scatter:
            mask = node.args[1]
        elif node.op in ("call_function", "call_method") and (
                node.target in _INDEX_PUT or node.target in ("index_put", "index_put_")):
            indices = node.args[1]
            mask = indices[0] if isinstance(indices, (list, tuple)) and len(indices) == 1 else None
        elif _is_feature_assignment(node):  # embeds[mask] = features (in place: embeds is the result)
            merges.append((node.args[0], node.args[1]))
            continue
        else:
            continue
        if _bool_mask(mask):
            merges.append((node, mask))
    return merges


def _is_feature_assignment(node: fx.Node) -> bool:
    """``embeds[mask] = features``: ``embeds`` ``[B, S, D]``, ``mask`` ``[B, S]`` bool, ``features``
    a tensor of rows (not a constant fill such as ``embeds[mask] = 0``)."""
    if not (node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3):
        return False
    embeds, mask, features = node.args
    embeds_value, features_value = example_value(embeds), example_value(features)
    if embeds_value is None or features_value is None or embeds_value.dim() != 3 or not _bool_mask(mask):
        return False
    return tuple(example_value(mask).shape) == tuple(embeds_value.shape[:2]) and features_value.dim() == 2


def to_token_mask(mask: torch.Tensor, batch: int, length: int) -> Optional[torch.Tensor]:
    """A merge mask ``[B, S, ...]`` reduced to ``[B, S]`` bool; ``None`` if it is not per token."""
    while mask.dim() > 2:
        mask = mask.any(dim=-1)
    if mask.numel() != batch * length:
        return None
    return mask.reshape(batch, length)
