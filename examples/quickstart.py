"""Compile a real model with the rotatek backend and compare its answer with the exact one.

    python examples/quickstart.py            # SmolLM2-135M-Instruct on CPU, r = 16 of d = 64
    python examples/quickstart.py --quick    # shorter prompt and answer (CI smoke test)

Prints both answers, the attention sites rewritten and the Key-cache bytes before/after, all
measured on the real caches that ``generate()`` returns.
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


def travel_log(entries: int) -> str:
    """A deterministic document: one sentence per city, each with facts a question can ask about."""
    lines = []
    for i in range(entries):
        city = CITIES[i % len(CITIES)]
        lines.append(f"Day {i + 1}: the caravan reached {city}, which trades in {GOODS[(3 * i) % len(GOODS)]} "
                     f"and has {40 + 7 * i} wells; the innkeeper there was named {CITIES[(i + 5) % len(CITIES)]}son.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short prompt and answer")
    parser.add_argument("--key-channels", type=int, default=16, help="r, Key channels kept (d = 64)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--inner", choices=["eager", "inductor"], default="eager",
                        help="what compiles the rewritten graphs (Inductor takes minutes on 2 cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    model, tokenizer = pretrained.load(pretrained.SMOLLM2)
    entries, new_tokens = (12, 16) if args.quick else (60, args.max_new_tokens)
    question = "Which goods does the caravan find in Dunmore? Answer in one sentence."
    messages = [{"role": "user", "content": f"Read this travel log.\n\n{travel_log(entries)}\n\n{question}"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    prompt_length = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)

    with torch.no_grad():
        start = time.perf_counter()
        exact = model.generate(**inputs, **settings)
        exact_seconds = time.perf_counter() - start

        backend = rotatek_compile.backend(key_channels=args.key_channels, inner=args.inner)
        model.compile(backend=backend)
        start = time.perf_counter()
        compressed = model.generate(**inputs, **settings)
        compressed_seconds = time.perf_counter() - start

    def answer(result) -> str:
        return tokenizer.decode(result.sequences[0, prompt_length:], skip_special_tokens=True).strip()

    before = rotatek_compile.cache_bytes(exact.past_key_values)
    after = rotatek_compile.cache_bytes(compressed.past_key_values)
    rewritten = next(report.rewritten for report in backend.reports if report.phase == "prefill")
    logger.info("prompt: %d tokens; compressed span: all but the last %d prompt tokens",
                prompt_length, backend.config.query_window)
    logger.info("exact answer      (%.1f s): %s", exact_seconds, answer(exact))
    logger.info("rotatek r=%d answer (%.1f s, compile included): %s",
                args.key_channels, compressed_seconds, answer(compressed))
    logger.info("attention sites rewritten: %d (%s … %s)", len(rewritten), rewritten[0], rewritten[-1])
    logger.info("Key cache bytes: %d → %d (%.1f%%); whole KV cache: %d → %d (%.1f%%)",
                before.keys, after.keys, 100 * after.keys / before.keys,
                before.total, after.total, 100 * after.total / before.total)


if __name__ == "__main__":
    main()
