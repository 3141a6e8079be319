"""Tiny random-init Hugging Face models, built from config classes (no hub), with image inputs.

One :class:`TinyModel` per architecture (kvpress style: the dataclass is both the description and
the behaviour); :data:`TINY_MODELS` drives the ``pytest.mark.parametrize`` matrix of
``tests/test_architectures.py``.

Every decoder: 2 layers (Gemma 3: one sliding + one full layer; Mllama: one self + one cross
layer), hidden 64, 4 query heads, 2 KV heads, head_dim 16, vocabulary 256, fp32. Vision towers:
2 layers, hidden 32. Weights and inputs come from fixed seeds.

Prompts (``inputs(model, batch)``)::

    batch 1:  [ 5 text | image | 6 text ]
    batch 2:  [ pad ×4 | 3 text | image | 5 text ]        image at position 7
              [ 9 text | image | 3 text ]                 image at position 9

(each model adds its own special tokens around the image; PaliGemma puts the image first, so its
rows differ by the left padding only). Text-only Llama gets 48 / 40 random tokens instead: the
compressed span is then "the prompt minus its last ``query_window`` tokens".
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import transformers as tf

VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
IMAGE = 250  # image placeholder token of every model here
TEXT_RANGE = (3, 200)  # random text tokens, clear of every special token

DECODER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
               max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

SEED = 0


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt row: ``pre`` tokens, the image, ``post`` tokens (text-only: ``pre`` tokens)."""

    pre: int
    post: int


ROWS = {1: (Row(5, 6),), 2: (Row(3, 5), Row(9, 3))}
TEXT_ROWS = {1: (48,), 2: (40, 48)}


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """A tiny architecture and how to prompt it.

    Parameters
    ----------
    name : str
        Test id.
    make_config : Callable[[], PretrainedConfig]
        The full model config (fresh object per call).
    model_class : type
        ``...ForConditionalGeneration`` / ``...ForCausalLM``.
    make_inputs : Callable[[model, int], dict]
        Keyword arguments of ``generate`` for batch 1 or 2 (``input_ids``, ``attention_mask``,
        ``pixel_values``, ...), left-padded.
    full_attention : int
        Decoder self-attention layers with full attention: what the backend must rewrite.
    skipped : tuple[str, ...]
        Substrings of the layer paths that must be reported as left exact (sliding-window,
        cross-attention, vision tower in the decoder's graph).
    has_image : bool
        The image enters through placeholder tokens merged into the embeddings (the compressed
        span is then the image tokens); ``False``: the span is the prompt's head.
    prepare : Optional[Callable[[model], None]]
        Edits the random-init weights after building (e.g. opens Mllama's zero-init gates).
    """

    name: str
    make_config: Callable[[], tf.PretrainedConfig]
    model_class: type
    make_inputs: Callable[[torch.nn.Module, int], dict]
    full_attention: int
    skipped: tuple[str, ...] = ()
    has_image: bool = True
    prepare: Optional[Callable[[torch.nn.Module], None]] = None

    def build(self, attn_implementation: str = "sdpa") -> torch.nn.Module:
        torch.manual_seed(SEED)
        config = self.make_config()
        config._attn_implementation = attn_implementation
        for sub in ("text_config", "vision_config"):
            if getattr(config, sub, None) is not None:
                getattr(config, sub)._attn_implementation = attn_implementation
        model = self.model_class(config).to(torch.float32).eval()
        if self.prepare is not None:
            self.prepare(model)
        model.generation_config.eos_token_id = None  # always generate max_new_tokens
        model.generation_config.pad_token_id = PAD
        return model

    def inputs(self, model: torch.nn.Module, batch: int) -> dict:
        torch.manual_seed(SEED + batch)
        return self.make_inputs(model, batch)

    @property
    def head_dim(self) -> int:
        return DECODER["head_dim"]


# ---------------------------------------------------------------------------------------------
# Prompt assembly


def _text(n: int) -> list[int]:
    return torch.randint(*TEXT_RANGE, (n,)).tolist()


def _left_pad(rows: list[list[int]], *extra: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Left-pad token rows (and parallel per-token rows, e.g. token types, padded with 0)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    padded = [torch.tensor([[0] * (width - len(r)) + r for r in rows_]) for rows_ in extra]
    return (ids, mask, *padded)


def _image_rows(batch: int, image: list[int], before: list[int] = (), after: list[int] = ()):
    """Rows of ``[BOS, pre text, before, image, after, post text]`` and their image-token types."""
    rows, types = [], []
    for row in ROWS[batch]:
        tokens = [BOS] + _text(row.pre) + list(before) + list(image) + list(after) + _text(row.post)
        rows.append(tokens)
        types.append([1 if t == IMAGE else 0 for t in tokens])
    return rows, types


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


# ---------------------------------------------------------------------------------------------
# Llama (text only)


def _llama_config():
    return tf.LlamaConfig(num_hidden_layers=2, **DECODER)


def _llama_inputs(model, batch):
    ids, mask = _left_pad([_text(n) for n in TEXT_ROWS[batch]])
    return dict(input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------
# LLaVA: CLIP 16×16 image, patch 4 → 16 patch tokens (CLS dropped)


def _clip(image_size=16):
    return tf.CLIPVisionConfig(image_size=image_size, patch_size=4, projection_dim=32, **VISION)


def _llava_config():
    return tf.LlavaConfig(vision_config=_clip(), text_config=tf.LlamaConfig(num_hidden_layers=2, **DECODER),
                          image_token_index=IMAGE, image_seq_length=16, vision_feature_layer=-2)


def _llava_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT: anyres with a 16×32 image on pinpoints {16×32, 32×16}: 1 base + 2 tiles of 16×16


def _llava_next_config():
    return tf.LlavaNextConfig(vision_config=_clip(), text_config=tf.LlamaConfig(num_hidden_layers=2, **DECODER),
                              image_token_index=IMAGE, image_grid_pinpoints=[[16, 32], [32, 16]],
                              vision_feature_layer=-2)


def _llava_next_inputs(model, batch):
    image_sizes = torch.tensor([[16, 32]] * batch)
    pixel_values = _pixels(batch, 3, 3, 16, 16)  # [B, 1 base + 2 tiles, C, H, W]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    n = features[0].shape[0]
    rows, _ = _image_rows(batch, [IMAGE] * n)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes)


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL: 32×32 image, patch 4 → 8×8 patches, merge 2×2 → 16 tokens; M-RoPE


_QWEN_GRID = (1, 8, 8)
_QWEN_TOKENS = 16
_VISION_START, _VISION_END = 248, 249


def _qwen_text(config_class):
    return config_class(num_hidden_layers=2, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **{k: v for k, v in DECODER.items() if k != "head_dim"})


def _qwen2_vl_config():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                 patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    return tf.Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(Qwen2VLTextConfig),
                            image_token_id=IMAGE, video_token_id=247,
                            vision_start_token_id=_VISION_START, vision_end_token_id=_VISION_END)


def _qwen2_5_vl_config():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig)

    vision = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                    out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                    temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(Qwen2_5_VLTextConfig),
                               image_token_id=IMAGE, video_token_id=247,
                               vision_start_token_id=_VISION_START, vision_end_token_id=_VISION_END)


def _qwen_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * _QWEN_TOKENS, [_VISION_START], [_VISION_END])
    ids, mask, mm_types = _left_pad(rows, types)
    t, h, w = _QWEN_GRID
    patch = 3 * 2 * 4 * 4  # C · temporal_patch · patch²
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types,
                pixel_values=_pixels(batch * t * h * w, patch),
                image_grid_thw=torch.tensor([_QWEN_GRID] * batch))


# ---------------------------------------------------------------------------------------------
# Gemma 3: SigLIP 32×32, patch 8 → 4×4 patches = 16 tokens (pooling kernel 1); layer 0 sliding
# (window 8, shorter than the prompt), layer 1 full


_BOI, _EOI = 246, 247


def _siglip(image_size, patch_size):
    return tf.SiglipVisionConfig(image_size=image_size, patch_size=patch_size, **VISION)


def _gemma3_config():
    text = tf.Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                               sliding_window=8, query_pre_attn_scalar=16, **DECODER)
    return tf.Gemma3Config(text_config=text, vision_config=_siglip(32, 8), mm_tokens_per_image=16,
                           boi_token_index=_BOI, eoi_token_index=_EOI, image_token_index=IMAGE)


def _gemma3_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 16, [_BOI], [_EOI])
    ids, mask, token_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                pixel_values=_pixels(batch, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM: 32×32 image, patch 4 → 64 patches, pixel shuffle ×2 → 16 tokens


_FAKE_AROUND, _GLOBAL_IMG = 246, 247


def _idefics3_vision(config_class):
    return config_class(image_size=32, patch_size=4, **VISION)


def _idefics3_config():
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    return tf.Idefics3Config(vision_config=_idefics3_vision(Idefics3VisionConfig),
                             text_config=tf.LlamaConfig(num_hidden_layers=2, **DECODER),
                             image_token_id=IMAGE, scale_factor=2)


def _smolvlm_config():
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    return tf.SmolVLMConfig(vision_config=_idefics3_vision(SmolVLMVisionConfig),
                            text_config=tf.LlamaConfig(num_hidden_layers=2, **DECODER),
                            image_token_id=IMAGE, scale_factor=2)


def _idefics3_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16, [_FAKE_AROUND, _GLOBAL_IMG], [_FAKE_AROUND])
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 1, 3, 32, 32),
                pixel_attention_mask=torch.ones(batch, 1, 32, 32, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# PaliGemma: SigLIP 16×16, patch 4 → 16 tokens; prompt = [image | BOS text "\n"], all prefix


_NEWLINE = 245


def _paligemma_config():
    text = tf.GemmaConfig(num_hidden_layers=2, **DECODER)
    return tf.PaliGemmaConfig(vision_config=_siglip(16, 4), text_config=text, image_token_index=IMAGE,
                              projection_dim=64, hidden_size=64, vocab_size=VOCAB)


def _paligemma_inputs(model, batch):
    rows = [[IMAGE] * 16 + [BOS] + _text(row.pre + row.post) + [_NEWLINE] for row in ROWS[batch]]
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# Mllama: one 16×16 tile (patch 4); decoder layer 0 self-attention, layer 1 cross-attention.
# The image enters through cross-attention only, so the compressed span is the prompt's head.


def _mllama_config():
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=2, image_size=16, patch_size=4, max_num_tiles=1,
                                supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                                vision_output_dim=64)
    text = MllamaTextConfig(num_hidden_layers=2, cross_attention_layers=[1],
                            **{k: v for k, v in DECODER.items() if k != "head_dim"})
    return tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)


def _mllama_open_gates(model):
    # Cross-attention gates are zero-init: tanh(0) = 0 would hide whatever the cross layers read
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)


def _mllama_inputs(model, batch):
    rows = []
    for n in TEXT_ROWS[batch]:
        rows.append([BOS, IMAGE] + _text(n - 2))
    ids, mask = _left_pad(rows)
    cross = torch.zeros(batch, ids.shape[1], 1, 1, dtype=torch.long)
    for b in range(batch):  # every token from the image token on sees the image
        cross[b, int((ids[b] == IMAGE).nonzero()[0, 0]):] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 1, 1, 3, 16, 16),
                aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long),
                aspect_ratio_mask=torch.ones(batch, 1, 1, dtype=torch.long),
                cross_attention_mask=cross)


# ---------------------------------------------------------------------------------------------

TINY_MODELS: list[TinyModel] = [
    TinyModel("llama", _llama_config, tf.LlamaForCausalLM, _llama_inputs, full_attention=2, has_image=False),
    TinyModel("llava", _llava_config, tf.LlavaForConditionalGeneration, _llava_inputs, full_attention=2),
    TinyModel("llava_next", _llava_next_config, tf.LlavaNextForConditionalGeneration, _llava_next_inputs,
              full_attention=2),
    TinyModel("qwen2_vl", _qwen2_vl_config, tf.Qwen2VLForConditionalGeneration, _qwen_inputs, full_attention=2),
    TinyModel("qwen2_5_vl", _qwen2_5_vl_config, tf.Qwen2_5_VLForConditionalGeneration, _qwen_inputs,
              full_attention=2),
    TinyModel("gemma3", _gemma3_config, tf.Gemma3ForConditionalGeneration, _gemma3_inputs, full_attention=1,
              skipped=("layers.0.self_attn",)),
    TinyModel("idefics3", _idefics3_config, tf.Idefics3ForConditionalGeneration, _idefics3_inputs,
              full_attention=2),
    TinyModel("smolvlm", _smolvlm_config, tf.SmolVLMForConditionalGeneration, _idefics3_inputs, full_attention=2),
    TinyModel("paligemma", _paligemma_config, tf.PaliGemmaForConditionalGeneration, _paligemma_inputs,
              full_attention=2),
    TinyModel("mllama", _mllama_config, tf.MllamaForConditionalGeneration, _mllama_inputs, full_attention=1,
              skipped=("layers.1.cross_attn",), has_image=False, prepare=_mllama_open_gates),
]

BY_NAME = {m.name: m for m in TINY_MODELS}


def image_token_counts(inputs: dict) -> torch.Tensor:
    """``[B]`` image placeholder tokens per row."""
    return (inputs["input_ids"] == IMAGE).sum(-1)
