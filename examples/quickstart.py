"""Compile a real model with the rotatek backend and compare its answer with the exact one.

    python examples/quickstart.py            # SmolLM2-135M-Instruct on CPU, kv_budget 0.63
    python examples/quickstart.py --quick    # shorter prompt and answer (CI smoke test)
    python examples/quickstart.py --kv-budget 0.25,0.5   # several budgets, one report each
    python examples/quickstart.py --key-channels 16      # RotateK alone: r of d = 64 Key channels

Prints the budget, both answers and whether they are the same, what became of the compressed
span's tokens (kept exact / compressed / dropped) and the true bytes kept (every stored tensor),
all measured on the real caches that ``generate()`` returns. A budget that changes the answer is
reported as such.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import rotatek_compile
from rotatek_compile import pretrained

logger = logging.getLogger("quickstart")

CITIES = ["Arden", "Belmora", "Cresthaven", "Dunmore", "Elsmere", "Falkirk", "Glenhollow", "Harrowgate",
          "Ivybridge", "Joringel", "Kestrel Bay", "Lindenfeld", "Marrowdale", "Northwick", "Oakhurst"]
GOODS = ["copper", "wool", "salt", "amber", "timber", "glass", "honey", "iron", "silk", "tea"]
HEAD_DIM = 64  # SmolLM2-135M


PASSWORD = "7314"


def travel_log(entries: int) -> str:
    """A deterministic document: one sentence per city, and in the middle the one fact asked about.

    SmolLM2-135M retrieves this fact with a wide margin (its greedy answer's every token leads the
    runner-up by ≥ 0.25 in probability); asked about the cities themselves it guesses, with
    margins of 0.001–0.03, so that any perturbation of the cache, compressed or not, changes the
    answer.
    """
    lines = []
    for i in range(entries):
        city = CITIES[i % len(CITIES)]
        lines.append(f"Day {i + 1}: the caravan reached {city}, which trades in {GOODS[(3 * i) % len(GOODS)]} "
                     f"and has {40 + 7 * i} wells; the innkeeper there was named {CITIES[(i + 5) % len(CITIES)]}son.")
    lines.insert(entries // 2, f"Note: the caravan's password is {PASSWORD}.")
    return "\n".join(lines)


def budget_text(config: rotatek_compile.RotateKConfig) -> str:
    rank = config.channels_for(HEAD_DIM)
    if config.kv_budget is not None:
        return (f"kv_budget {config.kv_budget:g}: the span keeps at most {config.kv_budget:.0%} of its KV bytes "
                f"(tiered: exact / RotateK at r = {rank} of d = {HEAD_DIM} / dropped, chosen per layer)")
    nominal = config.token_keep * (1 + rank / HEAD_DIM) / 2
    return (f"{config.method}, r = {rank} of d = {HEAD_DIM} Key channels, token keep {config.token_keep:g}: "
            f"nominal {nominal:.3f} of the span's KV bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short prompt and answer")
    parser.add_argument("--kv-budget", default="0.63",
                        help="fraction of the span's KV bytes kept (tiered cache); comma-separated: one run each")
    parser.add_argument("--key-channels", default="",
                        help="instead: RotateK alone, r Key channels kept (d = 64); comma-separated: one run each")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--inner", choices=["eager", "inductor"], default="eager",
                        help="what compiles the rewritten graphs (Inductor takes minutes on 2 cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rotatek_compile").setLevel(logging.WARNING)
    torch.manual_seed(0)

    model, tokenizer = pretrained.load(pretrained.SMOLLM2)
    entries, new_tokens = (12, 16) if args.quick else (60, args.max_new_tokens)
    question = "What is the caravan's password?"
    messages = [{"role": "user", "content": f"Read this travel log.\n\n{travel_log(entries)}\n\n{question}"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    prompt_length = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)

    def answer(result) -> str:
        return tokenizer.decode(result.sequences[0, prompt_length:], skip_special_tokens=True).strip()

    with torch.no_grad():
        start = time.perf_counter()
        exact = model.generate(**inputs, **settings)
        exact_seconds = time.perf_counter() - start
    before = rotatek_compile.cache_bytes(exact)  # the output's cache (`cache`, or `past_key_values` before transformers 5.24)
    logger.info("prompt: %d tokens; compressed span: all but the last 32 prompt tokens", prompt_length)
    logger.info("exact answer (%.1f s): %s%s", exact_seconds, answer(exact),
                "" if PASSWORD in answer(exact) else "  (the exact model misses the password)")

    runs = ([dict(key_channels=int(r)) for r in args.key_channels.split(",")] if args.key_channels
            else [dict(kv_budget=float(b)) for b in args.kv_budget.split(",")])
    broken = []
    for options in runs:
        backend = rotatek_compile.backend(**options, inner=args.inner)
        torch._dynamo.reset()  # each budget compiles afresh
        model.compile(backend=backend)
        with torch.no_grad():
            start = time.perf_counter()
            compressed = model.generate(**inputs, **settings)
            seconds = time.perf_counter() - start
        after = rotatek_compile.cache_bytes(compressed)
        split = rotatek_compile.span_split(compressed)
        rewritten = next(report.rewritten for report in backend.reports if report.phase == "prefill")
        same = answer(compressed) == answer(exact)
        logger.info("")
        logger.info("budget: %s", budget_text(backend.config))
        logger.info("compressed answer (%.1f s, compile included): %s", seconds, answer(compressed))
        logger.info("answer: %s", "the same as the exact answer" if same else
                    "DIFFERENT from the exact answer: this budget changes the answer")
        logger.info("attention sites rewritten: %d (%s … %s)", len(rewritten), rewritten[0], rewritten[-1])
        if split is not None:
            layers = after.compressed_layers
            logger.info("span tokens per layer: %d: %.1f kept exact, %.1f rotated (RotateK), %.1f dropped "
                        "(mean over %d layers)", split.span // layers, split.exact / layers, split.compressed / layers,
                        split.dropped / layers, layers)
            logger.info("true bytes of the span (K+V, basis and masks included): %d of %d (%.1f%%)",
                        split.stored_bytes, split.full_bytes, 100 * split.byte_ratio)
        logger.info("Key cache bytes: %d → %d (%.1f%%); whole KV cache: %d → %d (%.1f%%)",
                    before.keys, after.keys, 100 * after.keys / before.keys,
                    before.total, after.total, 100 * after.total / before.total)
        if not same:
            broken.append(budget_text(backend.config))
    if broken:
        logger.info("")
        logger.info("budgets that change the answer:\n  %s", "\n  ".join(broken))


if __name__ == "__main__":
    main()
