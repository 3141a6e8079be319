"""Decode graphs: the weight products run as ``rotatek.grouped_linear``, those that share an input as one op.

At batch 1 a decode step's time is mostly its weight bytes over the bandwidth each product reaches.
HF's layers multiply the same normed hidden state by q, k and v, and the second one by gate and
up, each a product of its own; the small ones (k and v) reach a quarter of the bandwidth under
cuBLAS, and some bring a split-K reduction kernel. Grouped, each set is one launch
(:mod:`rotatek_compile.kernels.triton_gemv`), and the products alone (o, down, the LM head) run
through the same kernel, which streams a matrix faster than cuBLAS does at batch 1 (measured in
``docs/performance.md``). The rule::

    y_i = linear(x, W_i)        (no bias; i ranges over every such product of the same x, graph order)
      → ys = rotatek.grouped_linear(x, [W_0, W_1, …]);  y_i = ys[i]

in groups of 1 to 3 (``q|k|v``), only where ``x`` holds at most 16 rows (decode steps: the
prefill's products are matrix products that cuBLAS already runs at full speed). On CPU, and where
the kernel does not serve the weights (fp32, strided), the op runs one ``F.linear`` per weight, as
the model did.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from rotatek_compile import ops  # noqa: F401  (registers torch.ops.rotatek.grouped_linear)
from rotatek_compile.kernels import GEMV_MAX_GROUP, GEMV_MAX_ROWS
from rotatek_compile.passes.rewrite import has_side_effects

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _bias_free_product(node: fx.Node) -> bool:
    """``linear(x, W)`` or ``linear(x, W, None)`` with a 2-D ``W`` (both given by position)."""
    if node.op != "call_function" or node.target not in _LINEAR or len(node.args) < 2:
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    weight = node.args[1]
    value = weight.meta.get("example_value") if isinstance(weight, fx.Node) else None
    return bias is None and isinstance(value, torch.Tensor) and value.dim() == 2


def _rows(node: fx.Node) -> float:
    """Rows of the products' input (the product of its leading sizes); ``inf`` if unknown or symbolic
    (reading a symbolic size would add a guard)."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return math.inf
    leading = value.shape[:-1]
    if not all(type(size) is int for size in leading):
        return math.inf
    return math.prod(leading)


def _written_between(first: fx.Node, last: fx.Node) -> bool:
    """Whether a node between ``first`` and ``last`` may write something in place (the group's
    products all move up to ``first``, so each must read its input and weight as ``first`` does;
    a write through a view of them would not name them, so any write counts)."""
    node = first.next
    while node is not last:
        if has_side_effects(node):
            return True
        node = node.next
    return False


def group_products(graph: fx.Graph, implementation: str) -> int:
    """Rewrite ``graph`` in place (see the module docstring); returns the number of ops made."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _bias_free_product(node):
            by_input.setdefault(node.args[0], []).append(node)
    groups = 0
    for x, products in by_input.items():
        if _rows(x) > GEMV_MAX_ROWS:
            continue
        dtypes = {p.args[1].meta["example_value"].dtype for p in products}
        if len(dtypes) != 1:
            continue
        for start in range(0, len(products), GEMV_MAX_GROUP):
            group = products[start:start + GEMV_MAX_GROUP]
            if len(group) > 1 and _written_between(group[0], group[-1]):
                continue
            with graph.inserting_before(group[0]):
                grouped = graph.call_function(torch.ops.rotatek.grouped_linear.default,
                                              (x, [p.args[1] for p in group], implementation))
                outputs = [graph.call_function(operator.getitem, (grouped, i)) for i in range(len(group))]
            grouped.meta["example_value"] = [p.meta.get("example_value") for p in group]
            for product, output in zip(group, outputs):
                output.meta.update(product.meta)
                product.replace_all_uses_with(output)
                graph.erase_node(product)
            groups += 1
    return groups
