"""Where a compiled prefill spends its time and memory: eager HF vs ``model.compile()`` vs rotatek.

    python benchmarks/prefill_profile.py --out $OUT              # GPU: 8 layers of the 8B shape, 16k
    python benchmarks/prefill_profile.py --tiny                  # CPU smoke run of the same code

For each recipe: one prefill to compile, one to check that nothing recompiles, then the timed
prefill (ms, peak memory) and a profiled one whose heaviest GPU kernels are printed. The kernel
names say which SDPA implementation ran (``flash``, ``fmha_cutlass``/``efficient``: memory-efficient,
``cudnn``, or ``bmm`` + ``softmax``: the math fallback). JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from transformers import DynamicCache

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rotatek_compile  # noqa: E402
from model_decode import _sync, build_model, device_time_by_op  # noqa: E402

logger = logging.getLogger("prefill_profile")
RECIPES = ("eager", "inductor", "rotatek", "rotatek-inner-eager")


def compile_for(model, recipe: str, key_channels: int):
    torch._dynamo.reset()
    model._compiled_call_impl = None
    if recipe == "inductor":
        model.compile()
    elif recipe == "rotatek":
        model.compile(backend=rotatek_compile.backend(key_channels=key_channels, span="prompt"))
    elif recipe == "rotatek-inner-eager":
        model.compile(backend=rotatek_compile.backend(key_channels=key_channels, span="prompt", inner="eager"))
    elif recipe != "eager":
        raise ValueError(f"unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")


def prefill(model, input_ids: torch.Tensor) -> float:
    """One prefill on a fresh cache; seconds."""
    cache = DynamicCache(config=model.config)
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync()
    del out, cache
    return time.perf_counter() - start


def sdpa_kind(names: list[str]) -> str:
    joined = " ".join(names).lower()
    for key, kind in (("flash", "flash"), ("cudnn", "cudnn"), ("fmha", "efficient"), ("efficient", "efficient")):
        if key in joined:
            return kind
    return "math or other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16444)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--key-channels", type=int, default=32)
    parser.add_argument("--cudnn", action="store_true", help="leave cuDNN SDPA on")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda" and not args.cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    tokens = 300 if args.tiny else args.tokens
    model = build_model(args.tiny, device, dtype, args.layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    rows = []
    for recipe in args.recipes.split(","):
        compile_for(model, recipe, args.key_channels)
        torch._dynamo.utils.counters.clear()
        first = prefill(model, input_ids)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        prefill(model, input_ids)
        recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        seconds = prefill(model, input_ids)
        peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else 0
        ops = device_time_by_op(lambda: prefill(model, input_ids), device)
        top = [(name[:90], ms, int(count)) for name, ms, count in ops[:10]]
        row = dict(recipe=recipe, tokens=tokens, layers=model.config.num_hidden_layers, first_s=first,
                   prefill_ms=1e3 * seconds, peak_above_weights_gb=peak / 1e9, recompiles=recompiles,
                   sdpa=sdpa_kind([name for name, _, _ in top]), top_kernels=top)
        rows.append(row)
        logger.info("%s: %.0f ms, peak %.2f GB above weights, SDPA %s, first call %.0f s, recompiles %d",
                    recipe, row["prefill_ms"], row["peak_above_weights_gb"], row["sdpa"], first, recompiles)
        for name, ms, count in top:
            logger.info("    %8.2f ms  %4d×  %s", ms, count, name)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_profile.json"), "w") as handle:
        json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       rows=rows), handle, indent=1)
    print(f"{'recipe':>20} | {'prefill ms':>10} | {'peak GB':>7} | sdpa")
    for row in rows:
        print(f"{row['recipe']:>20} | {row['prefill_ms']:>10.1f} | {row['peak_above_weights_gb']:>7.2f} | {row['sdpa']}")


if __name__ == "__main__":
    main()
