"""HF's cache under the name the installed transformers uses: in as ``CACHE_KWARG``, back out through
``output_cache``, with no deprecation warning on the way (``past_key_values`` up to 5.23, ``cache`` on)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers.utils.generic
from transformers import DynamicCache, LlamaForCausalLM

from rotatek_compile.hf_compat import CACHE_KWARG, cache_kwargs, output_cache
from tests.test_generate import tiny_llama


def test_the_cache_keyword_is_one_the_forward_declares():
    # the forward takes **kwargs too: a name it does not declare would be dropped without a word
    assert CACHE_KWARG in inspect.signature(LlamaForCausalLM.forward).parameters


@pytest.fixture
def logged(monkeypatch) -> list[str]:
    """The messages transformers' outputs log once (the old field name's alias logs there)."""
    messages: list[str] = []
    monkeypatch.setattr(transformers.utils.generic.logger, "warning_once", messages.append)
    return messages


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_the_cache_goes_in_and_comes_back_without_a_deprecation_warning(call, logged):
    model, input_ids = tiny_llama(), torch.randint(0, 128, (1, 5))
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)  # what the old keyword raises from 5.24
        if call == "forward":
            out = model(input_ids=input_ids, use_cache=True, **cache_kwargs(cache))
        else:
            out = model.generate(input_ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                 **cache_kwargs(cache))
    assert output_cache(out) is cache and cache.get_seq_length() > 0
    assert logged == []


def test_an_output_without_a_cache_gives_none(logged):
    with torch.no_grad():
        out = tiny_llama()(input_ids=torch.randint(0, 128, (1, 5)), use_cache=False)
    assert output_cache(out) is None
    assert output_cache({"past_key_values": "held"}) == "held"  # the old name, as outputs before 5.24 have it
    assert logged == []
