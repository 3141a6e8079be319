"""Decode graphs run their weight products as ``rotatek.grouped_linear`` ops, those that share an
input as one (``rotatek_compile.passes.group_products``), and the op's Triton kernels equal ``F.linear``."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from rotatek_compile import RotateKBackend, RotateKConfig
from rotatek_compile.passes.group_products import group_products
from tests.test_generate import HEAD_DIM, LAYERS, generate, max_logit_error, padded_prompt, tiny_llama
from tests.triton_interpreted import kernel_module

triton_gemv = kernel_module("triton_gemv")
LINEAR = torch._C._nn.linear
# per layer q|k|v, o, gate|up and down; the LM head
DECODE_OPS = 4 * LAYERS + 1


def _graphs(model, inputs, steps=3) -> list[fx.GraphModule]:
    """The Dynamo graphs of a generate() call: the prefill's, then the decode step's."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    model.compile(backend=grab)
    generate(model, inputs, steps=steps)
    torch._dynamo.reset()
    return graphs


def _count(graph: fx.Graph, target) -> int:
    return sum(node.op == "call_function" and node.target == target for node in graph.nodes)


def test_decode_graph_groups_q_k_v_and_gate_up_of_every_layer():
    graphs = _graphs(tiny_llama(), padded_prompt())
    prefill, decode = graphs[0], graphs[-1]  # (a first decode graph, then one with a dynamic cache length)
    linears = _count(decode.graph, LINEAR)  # per layer q, k, v, o, gate, up, down; the LM head
    assert linears == 7 * LAYERS + 1
    assert group_products(decode.graph, "auto") == DECODE_OPS
    decode.graph.lint()
    assert _count(decode.graph, torch.ops.rotatek.grouped_linear.default) == DECODE_OPS
    assert _count(decode.graph, LINEAR) == 0
    sizes = sorted(len(node.args[1]) for node in decode.graph.nodes
                   if node.target == torch.ops.rotatek.grouped_linear.default)
    assert sizes == [1] * (2 * LAYERS + 1) + [2] * LAYERS + [3] * LAYERS  # o, down, LM head; gate|up; q|k|v
    # the prefill's layer products are matrix products of 2 × 48 rows: left to cuBLAS (only the LM
    # head, on each row's last position, has few rows; the backend runs the pass on decode graphs alone)
    before = _count(prefill.graph, LINEAR)
    assert group_products(prefill.graph, "auto") == 1 and _count(prefill.graph, LINEAR) == before - 1


def _toy_graph(bias: bool = False, write_between: bool = False, dtypes=(torch.float32, torch.float32),
               rows: int = 1) -> fx.GraphModule:
    """``linear(x, w0[, b])``, (``x.add_(1)``), ``linear(x, w1)`` with example values, as Dynamo gives."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.empty(rows, 8)
    weights = []
    for i, dtype in enumerate(dtypes):
        w = graph.placeholder(f"w{i}")
        w.meta["example_value"] = torch.empty(4, 8, dtype=dtype)
        weights.append(w)
    b = graph.placeholder("b")
    first = graph.call_function(LINEAR, (x, weights[0], b if bias else None))
    if write_between:
        graph.call_method("add_", (x, 1))
    second = graph.call_function(LINEAR, (x, weights[1]))
    graph.output((first, second))
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("case", ["bias", "write between", "dtypes differ", "17 rows"])
def test_products_that_cannot_share_a_launch_stay_as_written(case):
    module = _toy_graph(bias=case == "bias", write_between=case == "write between",
                        dtypes=(torch.float16, torch.float32) if case == "dtypes differ" else (torch.float32,) * 2,
                        rows=17 if case == "17 rows" else 1)
    if case == "bias":  # the biased product stays; the other one runs alone as the op
        assert group_products(module.graph, "auto") == 1
        assert [n.args[2].name for n in module.graph.nodes if n.target == LINEAR] == ["b"]
        return
    assert group_products(module.graph, "auto") == 0
    assert _count(module.graph, LINEAR) == 2
    if case == "write between":  # the write is kept, in place
        assert any(node.op == "call_method" and node.target == "add_" for node in module.graph.nodes)


def test_grouped_toy_graph_computes_the_same_products():
    module = _toy_graph()
    x, w0, w1 = torch.randn(1, 8), torch.randn(4, 8), torch.randn(4, 8)
    want = module(x, w0, w1, None)
    assert group_products(module.graph, "auto") == 1
    module.recompile()
    assert [n.target for n in module.graph.nodes if n.op == "call_function"] == \
        [torch.ops.rotatek.grouped_linear.default, operator.getitem, operator.getitem]
    got = module(x, w0, w1, None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("grouped", [True, False])
def test_full_rank_decode_with_and_without_grouping_matches_uncompiled_model(inner, grouped):
    model, inputs = tiny_llama(), padded_prompt()
    exact = generate(model, inputs, steps=4)
    torch._dynamo.reset()
    backend = RotateKBackend(RotateKConfig(key_channels=HEAD_DIM, group_products=grouped), inner=inner)
    model.compile(backend=backend)
    out = generate(model, inputs, steps=4)
    assert torch.equal(out.sequences, exact.sequences)
    assert max_logit_error(out, exact) < 1e-5
    decode = [r for r in backend.reports if r.phase == "decode"]
    assert decode and all(r.grouped_products == (DECODE_OPS if grouped else 0) for r in decode)
    assert all(r.grouped_products == 0 for r in backend.reports if r.phase == "prefill")


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="group_products"):
        RotateKConfig(group_products="yes")


def test_op_runs_one_linear_per_weight_off_cuda_and_has_a_fake():
    x, weights = torch.randn(2, 1, 8), [torch.randn(5, 8), torch.randn(3, 8)]
    ys = torch.ops.rotatek.grouped_linear(x, weights)
    assert all(torch.equal(y, torch.nn.functional.linear(x, w)) for y, w in zip(ys, weights))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = torch.ops.rotatek.grouped_linear(mode.from_tensor(x), [mode.from_tensor(w) for w in weights])
    assert [tuple(f.shape) for f in fakes] == [(2, 1, 5), (2, 1, 3)]


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_triton_kernel_equals_linear_on_ragged_shapes_and_a_strided_input(batch, group):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter runs fp32
    generator = torch.Generator().manual_seed(batch * 10 + group)
    weights = [torch.randn(n, 100, generator=generator).to(device, dtype) for n in (40, 17, 33)[:group]]
    wide = torch.randn(batch, 130, generator=generator).to(device, dtype)
    x = wide[:, 10:110]  # a column slice: row stride 130, as q is a slice of a fused output
    got = triton_gemv.grouped_linear_triton(x, weights, tile=(16, 64))  # a set tile: autotuning takes minutes
    for y, w in zip(got, weights):
        want = torch.nn.functional.linear(x.float(), w.float())
        assert y.shape == want.shape and y.dtype == dtype
        torch.testing.assert_close(y.float(), want, rtol=2e-2 if device == "cuda" else 1e-4,
                                   atol=2e-2 if device == "cuda" else 1e-4)


@pytest.mark.parametrize("block_n", [2, 16])
def test_vector_kernel_tiles_of_few_rows_cover_ragged_matrices(block_n):
    """Batch 1 runs the vector kernel, whose tiles may hold as few as 2 weight rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(block_n)
    weights = [torch.randn(n, 100, generator=generator).to(device, dtype) for n in (7, 1, 33)]
    x = torch.randn(1, 100, generator=generator).to(device, dtype)
    got = triton_gemv.grouped_linear_triton(x, weights, tile=(block_n, 32))
    tolerance = 2e-2 if device == "cuda" else 1e-5
    for y, w in zip(got, weights):
        torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.float(), w.float()),
                                   rtol=tolerance, atol=tolerance)


def test_triton_kernel_serves_only_what_it_can():
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert triton_gemv.supports(x, [w, w, w])
    assert not triton_gemv.supports(x, [w] * 4)  # at most q, k, v
    assert not triton_gemv.supports(torch.randn(17, 64, dtype=torch.bfloat16), [w])  # more rows than a tile
    assert not triton_gemv.supports(x.float(), [w.float()])  # fp32: Triton's dot would round to TF32
    assert not triton_gemv.supports(x, [w.t().contiguous().t()])  # weight strided along K
    assert not triton_gemv.supports(x, [torch.randn(32, 48, dtype=torch.bfloat16)])  # K differs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the op's Triton path in a bf16 model")
def test_bf16_decode_on_cuda_runs_the_kernel_and_stays_close():
    model, inputs = tiny_llama().to("cuda", torch.bfloat16), {k: v.cuda() for k, v in padded_prompt().items()}
    exact = generate(model, inputs, steps=4)
    torch._dynamo.reset()
    backend = RotateKBackend(RotateKConfig(key_channels=HEAD_DIM), inner="inductor")
    model.compile(backend=backend)
    out = generate(model, inputs, steps=4)
    assert any(r.grouped_products == DECODE_OPS for r in backend.reports if r.phase == "decode")
    assert max_logit_error(out, exact) < 0.1  # bf16: a different summation order than cuBLAS's
