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

A gated MLP then multiplies the activated gate product by the up product, a kernel launch of its
own each layer; :func:`gate_products` folds it into the products' launch::

    ys = rotatek.grouped_linear(x, [W_g, W_u]);  y = act(ys[0]) * ys[1]      (act: silu, gelu(tanh))
      → y = rotatek.gated_linear(x, W_g, W_u, act)

where each of ``ys[0]``, ``ys[1]`` and ``act(ys[0])`` has no other use (either operand order).
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import fx

from rotatek_compile import ops  # registers torch.ops.rotatek.grouped_linear and gated_linear
from rotatek_compile.kernels import GEMV_MAX_GROUP, GEMV_MAX_ROWS
from rotatek_compile.passes.rewrite import has_side_effects

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_GELU = (torch._C._nn.gelu, torch.nn.functional.gelu)
_MUL = (operator.mul, torch.mul)


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


def _activation(node: fx.Node) -> Optional[str]:
    """The key of ``ops.GATE_ACTIVATIONS`` that ``node`` computes out of place on one tensor, else ``None``."""
    if node.op != "call_function" or len(node.args) != 1:
        return None
    if node.target is torch.nn.functional.silu and not node.kwargs.get("inplace", False):
        return "silu"
    if node.target in _GELU and dict(node.kwargs) == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _gated(grouped: fx.Node) -> Optional[tuple[fx.Node, fx.Node, str, int]]:
    """``(mul, act, activation, gate index)`` where ``grouped``'s two products feed only ``act(ys[g]) * ys[1 - g]``."""
    outputs = {user.args[1]: user for user in grouped.users
               if user.target is operator.getitem and isinstance(user.args[1], int)}
    if len(grouped.users) != 2 or sorted(outputs) != [0, 1]:
        return None
    for gate in (0, 1):
        act = _only_user(outputs[gate])
        activation = act is not None and _activation(act)
        mul = activation and _only_user(act)
        if (mul and mul.target in _MUL and not mul.kwargs and len(mul.args) == 2
                and set(mul.args) == {act, outputs[1 - gate]} and _only_user(outputs[1 - gate]) is mul):
            return mul, act, activation, gate
    return None


def gate_products(graph: fx.Graph, implementation: str) -> int:
    """Rewrite ``graph``'s ``rotatek.grouped_linear`` ops in place (see the module docstring);
    returns the number of ``rotatek.gated_linear`` ops made."""
    made = 0
    for grouped in list(graph.nodes):
        if grouped.target is not torch.ops.rotatek.grouped_linear.default or len(grouped.args[1]) != 2:
            continue
        match = _gated(grouped)
        if match is None:
            continue
        mul, act, activation, gate = match
        x, weights = grouped.args[0], grouped.args[1]
        with graph.inserting_before(grouped):  # where the products read x and the weights
            gated = graph.call_function(torch.ops.rotatek.gated_linear.default,
                                        (x, weights[gate], weights[1 - gate], activation, implementation))
        gated.meta.update(mul.meta)
        mul.replace_all_uses_with(gated)
        for node in [mul, act, *grouped.users, grouped]:  # each one's users erased before it
            graph.erase_node(node)
        made += 1
    return made
