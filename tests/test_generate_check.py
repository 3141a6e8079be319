"""``generate()`` that would run a rotatek-compiled model without its compiled forward says so, once.

``torch.compile(model, backend="rotatek").generate(...)`` runs the uncompiled model, and so does
``model.compile(...)`` on a model whose ``generate()`` calls an inner model's ``generate()``: the
backend is never called, so before this check nothing was compressed and nothing was said.
"""

from __future__ import annotations

import logging

import pytest
import torch

import rotatek_compile
from rotatek_compile.generate_check import uses_rotatek
from tests.test_generate import HEAD_DIM, generate, padded_prompt, tiny_llama
from tests.vlm_classes import BY_NAME

OPTIONS = {"key_channels": HEAD_DIM, "inner": "eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _our_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rotatek_compile" and r.levelno == logging.WARNING]


def test_torch_compile_then_generate_warns_once(caplog):
    model, inputs = tiny_llama(), padded_prompt()
    expected = generate(model, inputs, steps=2).sequences
    compiled = torch.compile(model, backend="rotatek", options=OPTIONS)
    with caplog.at_level(logging.WARNING):
        first = generate(compiled, inputs, steps=2)
        generate(compiled, inputs, steps=2)
    warnings = _our_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "LlamaForCausalLM" in warnings[0] and "torch.compile(model).generate() runs the uncompiled" in warnings[0]
    assert torch.equal(first.sequences, expected)  # what it ran: the uncompiled model


@pytest.mark.parametrize("compile_model", [
    lambda model: model.compile(backend="rotatek", options=OPTIONS),
    lambda model: model.compile(backend=rotatek_compile.backend(**OPTIONS)),
], ids=["options", "backend-object"])
def test_compiling_in_place_does_not_warn(compile_model, caplog):
    model, inputs = tiny_llama(), padded_prompt()
    compile_model(model)
    assert uses_rotatek(model)
    with caplog.at_level(logging.WARNING):
        generate(model, inputs, steps=2)
    assert not [w for w in _our_warnings(caplog) if "uncompiled" in w]


def test_other_backends_are_not_ours():
    model = tiny_llama()
    assert not uses_rotatek(model)
    assert not uses_rotatek(torch.compile(model, backend="eager"))
    model.compile(backend="eager")
    assert not uses_rotatek(model)
    assert uses_rotatek(torch.compile(tiny_llama(), backend="rotatek"))


INNER_GENERATE = ["blip", "blip-2", "instructblip", "instructblipvideo", "kosmos-2", "qwen2_5_omni", "qwen3_omni_moe"]


@pytest.mark.parametrize("name", INNER_GENERATE)
def test_inner_generate_models_warn(name, caplog):
    entry = BY_NAME[name]
    model = entry.build()
    inputs = entry.inputs(model, 2)
    model.compile(backend="rotatek", options=OPTIONS)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        try:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        except ValueError as error:  # transformers 5.17: Qwen3-Omni's generate() passes its inner one a kwarg
            if "model_kwargs" not in str(error):  # it rejects, after the check has run
                raise
    warnings = _our_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"{type(model).__name__}.generate() calls its inner" in warnings[0]


def test_generate_of_a_part_of_a_compiled_model_warns(caplog):
    """The inner model's generate() called directly: it runs its own forward, uncompiled."""
    entry = BY_NAME["blip-2"]
    model = entry.build()
    model.compile(backend="rotatek", options=OPTIONS)
    inner = model.language_model
    with caplog.at_level(logging.WARNING), torch.no_grad():
        inner.generate(input_ids=torch.randint(3, 100, (1, 12)), max_new_tokens=2, do_sample=False)
    warnings = _our_warnings(caplog)
    assert len(warnings) == 1 and "it is part of Blip2ForConditionalGeneration" in warnings[0], warnings


class _Server:
    """A compiled model kept as an attribute, called from a method."""

    def __init__(self, model):
        self.compiled = torch.compile(model, backend="rotatek", options=OPTIONS)

    def answer(self, inputs):
        with torch.no_grad():
            return self.compiled.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_a_compiled_wrapper_held_as_an_attribute_is_found(caplog):
    server = _Server(tiny_llama())
    with caplog.at_level(logging.WARNING):
        server.answer(padded_prompt())
    warnings = _our_warnings(caplog)
    assert len(warnings) == 1 and "torch.compile(model).generate()" in warnings[0], warnings
