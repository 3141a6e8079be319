"""Tiny random-init models of the VLM classes of part c (``nemo_speechlm`` … ``voxtral_realtime``).

Same conventions as ``tests/tiny_models.py``: 2 decoder layers, hidden 64, 4 query heads, 2 KV
heads, head_dim 16, vocabulary 256, fp32, vision towers of 1–2 layers, images of 16 tokens, fixed
seeds. Config classes missing from an older transformers are imported inside ``make_config``.

:data:`MODELS` lists what is built; :data:`NOT_BUILDABLE` says why the other model types of the
part are not; :data:`KNOWN_GAPS` (check → model type → cause) are product gaps, expected to fail.
"""

from __future__ import annotations

import torch
import transformers as tf

from tests.tiny_models import (
    BOS, DECODER, IMAGE, ROWS, VISION, TinyModel, _clip, _image_rows, _left_pad, _pixels, _siglip, _text)

_VIDEO = 247


def _llama(**extra):
    return tf.LlamaConfig(num_hidden_layers=2, **DECODER, **extra)


def _class(module: str, name: str):
    """A model class by name, resolved at build time (missing from older transformers → the
    harness skips)."""

    def resolve():
        return getattr(__import__(f"transformers.models.{module}", fromlist=[name]), name)

    return resolve


# ---------------------------------------------------------------------------------------------
# VipLLaVA: CLIP 16×16, patch 4 → 16 patch tokens; features from two vision layers


def _vipllava_config():
    return tf.VipLlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE,
                             image_seq_length=16, vision_feature_layer=[-2, -1])


def _llava_like_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# Video-LLaVA: image tower CLIP 16×16, patch 4 → 16 tokens (CLS dropped, strategy "default")


def _video_llava_config():
    return tf.VideoLlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE,
                               video_token_index=_VIDEO, image_seq_length=16, video_seq_length=17 * 2,
                               vision_feature_layer=-2)


def _video_llava_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_images=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# PerceptionLM: its vision tower is a timm model (timm is not a dependency here); a CLIP tower of
# the same interface stands in (``model_args["embed_dim"]`` is what the projector reads).
# 16×16 image, patch 4 → 16 tokens after the CLS token is dropped.


def _perception_lm_config():
    vision = _clip()
    vision.model_args = {"embed_dim": VISION["hidden_size"]}
    return tf.PerceptionLMConfig(vision_config=vision, text_config=_llama(), image_token_id=IMAGE,
                                 video_token_id=_VIDEO, projector_pooling_ratio=1)


def _perception_lm_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# ShieldGemma 2: Gemma 3 under its own config (the image-text-to-text mapping builds
# Gemma3ForConditionalGeneration); layer 0 sliding (window 8), layer 1 full


_BOI, _EOI = 246, 247


def _shieldgemma2_config():
    from transformers.models.shieldgemma2.configuration_shieldgemma2 import ShieldGemma2Config

    text = tf.Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                               sliding_window=8, query_pre_attn_scalar=16, **DECODER)
    return ShieldGemma2Config(text_config=text, vision_config=_siglip(32, 8), mm_tokens_per_image=16,
                              boi_token_index=_BOI, eoi_token_index=_EOI, image_token_index=IMAGE)


def _gemma3_like_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 16, [_BOI], [_EOI])
    ids, mask, token_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                pixel_values=_pixels(batch, 3, 32, 32))


# ---------------------------------------------------------------------------------------------


MODELS: list[TinyModel] = [
    TinyModel("vipllava", _vipllava_config, tf.VipLlavaForConditionalGeneration, _llava_like_inputs,
              full_attention=2),
    TinyModel("video_llava", _video_llava_config, tf.VideoLlavaForConditionalGeneration, _video_llava_inputs,
              full_attention=2),
    TinyModel("perception_lm", _perception_lm_config, tf.PerceptionLMForConditionalGeneration,
              _perception_lm_inputs, full_attention=2),
    TinyModel("shieldgemma2", _shieldgemma2_config, tf.Gemma3ForConditionalGeneration, _gemma3_like_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
]

NOT_BUILDABLE: dict[str, str] = {}

KNOWN_GAPS: dict[str, dict[str, str]] = {}
