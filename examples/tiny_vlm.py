"""A tiny LLaVA (random weights) whose image span gets compressed: where the span is, and the bytes.

    python examples/tiny_vlm.py

The prompt is ``[text | 64 image tokens | text]`` for two rows with left padding and the image at
different positions. The backend finds the image-feature merge in the traced graph, compresses
exactly those 64 tokens' Keys to ``r = 8`` of ``d = 32`` channels, and decodes on them.
"""

from __future__ import annotations

import logging

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import rotatek_compile
from rotatek_compile.hf_compat import output_cache
from rotatek_compile.state import attached

logger = logging.getLogger("tiny_vlm")
IMAGE_TOKEN = 250


def tiny_llava() -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=64, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = tiny_llava()
    image_tokens = (64 // 8) ** 2
    rows = []
    for before, after in ((6, 30), (20, 10)):  # the image sits at different positions
        rows.append(torch.cat([torch.randint(0, 200, (before,)), torch.full((image_tokens,), IMAGE_TOKEN),
                               torch.randint(0, 200, (after,))]))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):  # left padding
        input_ids[i, length - len(row):], attention_mask[i, length - len(row):] = row, 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(2, 3, 64, 64))
    settings = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)

    with torch.no_grad():
        exact = model.generate(**inputs, **settings)
        model.compile(backend="rotatek", options={"key_channels": 8, "inner": "eager"})
        compressed = model.generate(**inputs, **settings)

    cache = output_cache(compressed)
    layer = attached(cache.layers[0].keys)
    before = rotatek_compile.cache_bytes(exact)
    after = rotatek_compile.cache_bytes(compressed)
    logger.info("image tokens per row: %s; compressed span per row: %s",
                (input_ids == IMAGE_TOKEN).sum(1).tolist(), layer.span_mask.sum(1).tolist())
    logger.info("span Keys kept: %s (K̃, r = %d of d = %d)", tuple(layer.span_key_parts[0].shape),
                layer.rank, layer.head_dim)
    logger.info("Key cache bytes: %d → %d (%.1f%%)", before.keys, after.keys, 100 * after.keys / before.keys)
    logger.info("exact tokens:      %s", exact.sequences[:, length:].tolist())
    logger.info("compressed tokens: %s", compressed.sequences[:, length:].tolist())


if __name__ == "__main__":
    main()
