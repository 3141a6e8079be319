"""StaticCache + CUDA graphs on CUDA (tiny Llama): ``generate(..., cache_implementation="static")``
with the decode step under ``mode="reduce-overhead"``. Skipped without a GPU.

``disable_compile=True``: ``generate()`` would otherwise wrap the decode step in a redundant
``torch.compile(..., backend="inductor")`` of its own (the model's compiled call inside still runs
under the rotatek backend; CUDA graphs come from the backend's ``mode``).
"""

from __future__ import annotations

import pytest
import torch

import rotatek_compile
from rotatek_compile.hf_compat import output_cache

from rotatek_compile.state import attached
from rotatek_compile.static_cache import StaticCompressedLayer
from tests.test_generate import HEAD_DIM, max_logit_error, padded_prompt, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _generate(model, inputs, steps: int):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, cache_implementation="static",
                              disable_compile=True)


def test_full_rank_static_under_cuda_graphs():
    # two requests (the second shorter, so the cache length and the decode graph stay): exact at
    # r = d, every decode step replayed from a CUDA graph, weights and state never copied in
    model = tiny_llama().cuda()
    requests = [{k: v.cuda() for k, v in padded_prompt(length=n).items()} for n in (48, 44)]
    exact = [_generate(model, inputs, 12) for inputs in requests]
    model.compile(backend=rotatek_compile.backend(key_channels=HEAD_DIM, mode="reduce-overhead"))
    compressed = [_generate(model, requests[0], 12)]
    # inputs copied into the graph's memory on each replay (one recording so far): token ids,
    # positions, mask and HF's stand-ins, never the weights nor the compressed state
    copied = torch._dynamo.utils.counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    assert 0 < copied < len(list(model.parameters()))
    compressed.append(_generate(model, requests[1], 12))
    for e, c in zip(exact, compressed):
        assert torch.equal(e.sequences, c.sequences)
        assert max_logit_error(e, c) < 1e-3
        assert all(isinstance(attached(layer.keys), StaticCompressedLayer) for layer in output_cache(c).layers)
    counters = torch._dynamo.utils.counters
    assert counters["inductor"]["cudagraph_skips"] == 0
    # prefill, decode, and the prefill again for the second length; no second decode graph
    assert counters["stats"]["unique_graphs"] == 3
