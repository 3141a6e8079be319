"""Tiny random-init models of the VLM classes of part b (model types ``granite_docling`` …
``muse_spark`` of transformers' image-text-to-text and multimodal-LM mappings).

Same shapes as ``tests/tiny_models.py``: 2 decoder layers, hidden 64, 4 query / 2 KV heads,
head_dim 16, vocabulary 256, fp32; vision towers of 1–2 layers; one image of 16 tokens (unless
the class fixes another count, noted per model). Every config and class is looked up by name
when the model is built (:mod:`tests.vlm_classes.common`), so that this module imports on
transformers releases that lack some of them (the harness skips those).

:data:`NOT_BUILDABLE` lists the model types that cannot be built tiny or prompted with an image
here, with the reason; :data:`KNOWN_GAPS` the checks a class fails because of the product, with
the cause (``xfail(strict=True)``).
"""

from __future__ import annotations

import torch

from tests.tiny_models import (
    BOS, DECODER, EOS, IMAGE, PAD, TEXT_ROWS, VISION, VOCAB, TinyModel, _image_rows, _left_pad, _pixels, _text)
from tests.vlm_classes.common import LazyClass, tf_class


_FAKE_AROUND, _GLOBAL_IMG = 246, 247  # Idefics-style tokens around the image


def _text_config(name: str, module: str = "", **overrides):
    """The shared tiny decoder as config class ``name`` (2 layers unless overridden)."""
    return tf_class(name, module)(**{"num_hidden_layers": 2, **DECODER, **overrides})


class _EagerOnly(LazyClass):
    """A class without SDPA support: built with eager attention (what ``from_pretrained`` picks for it),
    whatever ``TinyModel.build`` asked for."""

    def __call__(self, config):
        for sub in (config, *(getattr(config, name, None) for name in ("text_config", "vision_config"))):
            if sub is not None:
                sub._attn_implementation = "eager"
        return super().__call__(config)


def _image_inputs(batch: int, tokens: int, before=(), after=(), **image):
    """``[BOS, text, before, IMAGE × tokens, after, text]`` rows, left-padded, plus ``image``."""
    rows, _ = _image_rows(batch, [IMAGE] * tokens, before, after)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, **image)


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT-Video / LLaVA-OneVision: as LLaVA-NeXT (anyres, 16×32 image on pinpoints
# {16×32, 32×16}: 1 base + 2 tiles of 16×16); the token count comes from the model


def _clip(image_size=16):
    return tf_class("CLIPVisionConfig")(image_size=image_size, patch_size=4, projection_dim=32, **VISION)


def _siglip(image_size, patch_size):
    return tf_class("SiglipVisionConfig")(image_size=image_size, patch_size=patch_size, **VISION)


def _llava_next_video_config():
    return tf_class("LlavaNextVideoConfig")(
        vision_config=_clip(), text_config=_text_config("LlamaConfig"), image_token_index=IMAGE,
        video_token_index=249, image_grid_pinpoints=[[16, 32], [32, 16]], vision_feature_layer=-2)


def _llava_onevision_config():
    return tf_class("LlavaOnevisionConfig")(
        vision_config=_siglip(16, 4), text_config=_text_config("Qwen2Config"), image_token_index=IMAGE,
        video_token_index=249, image_grid_pinpoints=[[16, 32], [32, 16]], vision_feature_layer=-1)


def _anyres_inputs(model, batch):
    image_sizes = torch.tensor([[16, 32]] * batch)
    pixel_values = _pixels(batch, 3, 3, 16, 16)  # [B, 1 base + 2 tiles, C, H, W]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    return _image_inputs(batch, features[0].shape[0], pixel_values=pixel_values, image_sizes=image_sizes)


# ---------------------------------------------------------------------------------------------
# Mistral3 / LightOnOCR: Pixtral 32×32, patch 4 → 8×8 patches, spatial merge 2 → 16 tokens


def _pixtral():
    return tf_class("PixtralVisionConfig")(image_size=32, patch_size=4, head_dim=16, **VISION)


def _mistral3_config():
    # Mistral-Small-3.1's decoder has no sliding window (MistralConfig's default is 4096)
    text = _text_config("MistralConfig", sliding_window=None)
    return tf_class("Mistral3Config")(vision_config=_pixtral(), text_config=text, image_token_index=IMAGE,
                                      spatial_merge_size=2)


def _lighton_ocr_config():
    return tf_class("LightOnOcrConfig")(vision_config=_pixtral(), text_config=_text_config("Qwen3Config"),
                                        image_token_id=IMAGE, spatial_merge_size=2)


def _pixtral_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch, 3, 32, 32),
                         image_sizes=torch.tensor([[32, 32]] * batch))


# ---------------------------------------------------------------------------------------------
# InternVL: 32×32 image, patch 4 → 8×8 patches, pixel shuffle 0.5 → 16 tokens


def _internvl_config():
    vision = tf_class("InternVLVisionConfig")(image_size=32, patch_size=4, **VISION)
    return tf_class("InternVLConfig")(vision_config=vision, text_config=_text_config("Qwen2Config"),
                                      image_token_id=IMAGE, image_seq_length=16, downsample_ratio=0.5)


def _internvl_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Idefics2: 32×32 image, patch 4 → 64 patches, perceiver resampler → 16 latents


def _idefics2_config():
    vision = tf_class("Idefics2VisionConfig", "idefics2")(image_size=32, patch_size=4, **VISION)
    perceiver = tf_class("Idefics2PerceiverConfig", "idefics2")(
        hidden_size=64, resampler_n_latents=16, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
        num_key_value_heads=1)
    text = _text_config("MistralConfig", sliding_window=None)
    return tf_class("Idefics2Config")(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                      image_token_id=IMAGE)



def _idefics2_inputs(model, batch):
    return _image_inputs(batch, 16, [_FAKE_AROUND], [_FAKE_AROUND], pixel_values=_pixels(batch, 1, 3, 32, 32),
                         pixel_attention_mask=torch.ones(batch, 1, 32, 32, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Granite-Docling: one 32×32 tile, patch 4 → 64 patches, pixel shuffle ×2 → 16 tokens; one
# DeepStack layer (vision layer 0's features added to the image positions after decoder layer 0)


def _granite_docling_config():
    vision = tf_class("GraniteDoclingVisionConfig", "granite_docling")(
        image_size=32, patch_size=4, out_hidden_size=64, scale_factor=2, deepstack_visual_indexes=[0], **VISION)
    text = _text_config("GraniteDoclingTextConfig", "granite_docling")
    return tf_class("GraniteDoclingConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                            pad_token_id=PAD)


def _granite_docling_inputs(model, batch):
    return _image_inputs(batch, 16, [_FAKE_AROUND, _GLOBAL_IMG], [_FAKE_AROUND],
                         pixel_values=_pixels(batch, 1, 3, 32, 32),
                         pixel_attention_mask=torch.ones(batch, 1, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# LFM2-VL: SigLIP2 (NaFlex) 8×8 patches of 4×4, downsample 2 → 16 tokens; LFM2 decoder: layer 0
# a short convolution (no attention, state in the cache), layer 1 full attention


def _lfm2_vl_config():
    vision = tf_class("Siglip2VisionConfig")(patch_size=4, num_patches=64, vision_use_head=False, **VISION)
    text = _text_config("Lfm2Config", layer_types=["conv", "full_attention"], norm_eps=1e-5)
    return tf_class("Lfm2VlConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                    projector_hidden_size=64, downsample_factor=2)


def _naflex_inputs(model, batch):
    patches = 8 * 8
    return _image_inputs(batch, 16, pixel_values=_pixels(batch, patches, 3 * 4 * 4),
                         spatial_shapes=torch.tensor([[8, 8]] * batch),
                         pixel_attention_mask=torch.ones(batch, patches, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# LFM3-VL: 2-D patches (Qwen-style flattened 8×8 patches of 4×4), merge 2 → 16 tokens; LFM3
# decoder: convolution, sliding-window (window 8) and full-attention layers


def _lfm3_vl_config():
    vision = tf_class("Lfm3VlVisionConfig", "lfm3_vl")(
        num_key_value_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=1,
        layer_types=["conv", "full_attention"], **VISION)
    text = _text_config("Lfm3Config", num_hidden_layers=3,
                        layer_types=["conv", "sliding_attention", "full_attention"], sliding_window=8)
    return tf_class("Lfm3VlConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=247,
                                    vision_start_token_id=248, vision_end_token_id=249, projector_hidden_size=64)


def _lfm3_vl_inputs(model, batch):
    grid = (1, 8, 8)
    return _image_inputs(batch, 16, [248], [249], pixel_values=_pixels(batch * 64, 3 * 4 * 4),
                         image_grid_thw=torch.tensor([grid] * batch))


# ---------------------------------------------------------------------------------------------
# Janus: SigLIP-like 16×16 image, patch 4 → 16 tokens (the VQ image generator is built, unused)


def _janus_config():
    vision = tf_class("JanusVisionConfig", "janus")(image_size=16, patch_size=4, projection_dim=64, depth=2,
                                                   num_image_tokens=16, **VISION)
    vq = tf_class("JanusVQVAEConfig", "janus")(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                                               channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=64,
                                               image_token_embed_dim=64)
    return tf_class("JanusConfig")(vision_config=vision, vq_config=vq, text_config=_text_config("LlamaConfig"),
                                   image_token_id=IMAGE)


def _janus_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# InstructBLIP / InstructBLIP-Video: ViT 16×16, patch 4; a 2-layer Q-Former reads the patches with
# 16 queries (video: 2 frames × 8 queries) → 16 tokens for a Llama decoder. Their own generate()
# runs the Q-Former, merges, then calls the inner language model's generate().


def _blip_vision(module: str, prefix: str):
    return tf_class(f"{prefix}VisionConfig", module)(image_size=16, patch_size=4, **VISION)


def _qformer(module: str, prefix: str):
    return tf_class(f"{prefix}QFormerConfig", module)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        cross_attention_frequency=1, encoder_hidden_size=32)


def _instructblip_config():
    prefix = "InstructBlip"
    return tf_class("InstructBlipConfig")(
        vision_config=_blip_vision("instructblip", prefix), qformer_config=_qformer("instructblip", prefix),
        text_config=_text_config("LlamaConfig"), num_query_tokens=16, image_token_index=IMAGE)


def _instructblipvideo_config():
    prefix = "InstructBlipVideo"
    return tf_class("InstructBlipVideoConfig")(
        vision_config=_blip_vision("instructblipvideo", prefix), qformer_config=_qformer("instructblipvideo", prefix),
        text_config=_text_config("LlamaConfig"), num_query_tokens=8, video_token_index=IMAGE)


def _qformer_text(batch):
    ids, mask = _left_pad([_text(4) for _ in range(batch)])
    return dict(qformer_input_ids=ids, qformer_attention_mask=mask)


def _instructblip_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch, 3, 16, 16), **_qformer_text(batch))


def _instructblipvideo_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch, 2, 3, 16, 16), **_qformer_text(batch))


# ---------------------------------------------------------------------------------------------
# IDEFICS (v1, Flamingo-style): CLIP-like 16×16 image, patch 4 → 17 image states read by a gated
# cross-attention block before decoder layer 0 (gates opened: alpha 1). The image enters through
# cross-attention only, so the compressed span is the prompt's head.


def _idefics_config():
    vision = tf_class("IdeficsVisionConfig", "idefics")(embed_dim=32, image_size=16, patch_size=4,
                                                       intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2)
    decoder = {k: v for k, v in DECODER.items() if k not in ("num_key_value_heads", "head_dim")}
    return tf_class("IdeficsConfig")(vision_config=vision, num_hidden_layers=2, cross_layer_interval=2,
                                     alpha_initializer="ones", **decoder)


def _idefics_inputs(model, batch):
    rows = [[BOS, IMAGE] + _text(n - 2) for n in TEXT_ROWS[batch]]
    ids, mask = _left_pad(rows)
    sees_image = torch.zeros(batch, ids.shape[1], 1, dtype=torch.long)
    for b in range(batch):  # every token from the image token on sees the image
        sees_image[b, int((ids[b] == IMAGE).nonzero()[0, 0]):] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 1, 3, 16, 16),
                image_attention_mask=sees_image)


# ---------------------------------------------------------------------------------------------
# KOSMOS-2 / KOSMOS-2.5: the vision features are resampled to 16 latent queries, written into the
# embeddings at ``image_embeds_position_mask`` (boolean-index assignment). KOSMOS-2: CLIP-like
# 16×16 image, patch 4, and its own generate() that calls the inner text model's generate().
# KOSMOS-2.5: Pix2Struct-style flattened patches (8×8 patches of 4×4, with row/column ids).


def _kosmos_text(module: str, prefix: str):
    return tf_class(f"{prefix}TextConfig", module)(
        vocab_size=VOCAB, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4, max_position_embeddings=512,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _kosmos2_config():
    vision = tf_class("Kosmos2VisionConfig", "kosmos2")(image_size=16, patch_size=4, **VISION)
    return tf_class("Kosmos2Config")(vision_config=vision, text_config=_kosmos_text("kosmos2", "Kosmos2"),
                                     latent_query_num=16)


def _kosmos2_5_config():
    vision = tf_class("Kosmos2_5VisionConfig", "kosmos2_5")(
        hidden_size=32, patch_embed_hidden_size=3 * 4 * 4, intermediate_size=64, head_dim=16, num_hidden_layers=2,
        num_attention_heads=2, max_num_patches=64)
    return tf_class("Kosmos2_5Config")(vision_config=vision, text_config=_kosmos_text("kosmos2_5", "Kosmos2_5"),
                                       latent_query_num=16)


def _kosmos_position_mask(ids):
    return (ids == IMAGE).long()  # [B, S]: where the 16 latent queries go


def _kosmos2_inputs(model, batch):
    inputs = _image_inputs(batch, 16, pixel_values=_pixels(batch, 3, 16, 16))
    return dict(inputs, image_embeds_position_mask=_kosmos_position_mask(inputs["input_ids"]))


def _flattened_patches(batch: int, grid: int = 8, patch: int = 4) -> torch.Tensor:
    """``[B, grid², 2 + patch²·3]``: 1-based row and column ids, then the patch's pixels."""
    rows, columns = torch.meshgrid(torch.arange(1, grid + 1), torch.arange(1, grid + 1), indexing="ij")
    ids = torch.stack([rows.flatten(), columns.flatten()], -1).float()  # [grid², 2]
    return torch.cat([ids.expand(batch, -1, -1), _pixels(batch, grid * grid, patch * patch * 3)], -1)


def _kosmos2_5_inputs(model, batch):
    inputs = _image_inputs(batch, 16, flattened_patches=_flattened_patches(batch))
    return dict(inputs, image_embeds_position_mask=_kosmos_position_mask(inputs["input_ids"]))


# ---------------------------------------------------------------------------------------------
# Mistral 4 (text only: a causal LM in the multimodal mapping): multi-head latent attention
# (q/kv LoRA ranks 32, 8 NoPE + 8 RoPE channels per Key head = head_dim 16, 4 heads) whose cache
# holds the latent (kv_lora_rank channels) and the shared RoPE Key, expanded to per-head Keys after
# the cache read; layer 0 dense, layer 1 MoE (4 routed experts, 2 per token, 1 shared). The span
# is the prompt's head. Mistral Large 4: Pixtral + the same latent attention with a DeepSeek-style
# sparse-attention indexer (top-k over the cached tokens).

_MLA = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=VOCAB, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=512, num_hidden_layers=2)


def _mistral4_config():
    # its default YaRN stretches 8192 positions 128×: a matching length keeps transformers from warning
    return tf_class("Mistral4Config")(q_lora_rank=32, first_k_dense_replace=1, **{
        **_MLA, "max_position_embeddings": 8192 * 128})


def _text_inputs(model, batch):
    ids, mask = _left_pad([_text(n) for n in TEXT_ROWS[batch]])
    return dict(input_ids=ids, attention_mask=mask)


def _mistral_large4_config():
    text = tf_class("MistralLarge4TextConfig", "mistral_large4")(
        first_k_dense_replace=1, index_topk=8, index_head_dim=16, index_n_heads=2, no_rope_layers=[1, 1], **_MLA)
    return tf_class("MistralLarge4Config")(vision_config=_pixtral(), text_config=text, image_token_index=IMAGE,
                                           spatial_merge_size=2)


# ---------------------------------------------------------------------------------------------
# Molmo2: one 16×16 crop, patch 4 → 16 patches; the adapter pools one patch per token (1×1
# pooling) → 16 tokens, added onto the placeholder embeddings; image tokens attend each other
# bidirectionally at prefill (``mm_token_type_ids``)


def _molmo2_config():
    vision = tf_class("Molmo2VisionConfig", "molmo2")(num_key_value_heads=2, head_dim=16, image_size=[16, 16],
                                                      patch_size=4, **VISION)
    adapter = tf_class("Molmo2AdapterConfig", "molmo2")(
        vision_feature_layer=[-1], hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, text_hidden_size=64)
    text = _text_config("Molmo2TextConfig", "molmo2", additional_vocab_size=0)
    return tf_class("Molmo2Config")(vision_config=vision, adapter_config=adapter, text_config=text,
                                    image_patch_id=IMAGE, image_start_token_id=246, low_res_image_start_token_id=245,
                                    image_end_token_id=247, frame_start_token_id=243, frame_end_token_id=244)


def _molmo2_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 16, [246], [247])
    ids, mask, mm_types = _left_pad(rows, types)
    pooling = torch.arange(batch * 16)[:, None]  # [tokens, 1]: token i of image b pools patch b·16 + i
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types,
                pixel_values=_pixels(batch, 16, 4 * 4 * 3), image_token_pooling=pooling,
                image_grids=torch.tensor([[4, 4, 0, 0]] * batch))


# ---------------------------------------------------------------------------------------------
# MiniCPM-V 4.6 / MiniCPM-OCR: NaViT-packed 32×32 image (8×8 patches of 4), "4x" downsampling
# (one 2×2 merge) → 16 tokens; Qwen3.5 decoder: layer 0 gated-DeltaNet linear attention (its
# recurrent and convolution states live in the cache), layer 1 full attention


def _qwen3_5_text():
    return _text_config("Qwen3_5TextConfig", "qwen3_5", layer_types=["linear_attention", "full_attention"],
                        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                        linear_num_key_heads=2, linear_num_value_heads=4)


def _minicpm_config(name: str, module: str, **extra):
    vision = tf_class(f"{name}VisionConfig", module)(image_size=32, patch_size=4, insert_layer_id=0, **VISION)
    return tf_class(f"{name}Config")(vision_config=vision, text_config=_qwen3_5_text(), image_token_id=IMAGE,
                                     video_token_id=249, image_size=32, downsample_mode="4x", **extra)


def _minicpm_ocr_config():
    return _minicpm_config("MiniCPMOcr", "minicpm_ocr")


def _minicpmv4_6_config():
    return _minicpm_config("MiniCPMV4_6", "minicpmv4_6")


def _navit_pixels(images: int, grid: int = 8, patch: int = 4) -> torch.Tensor:
    """``[1, C, patch, images·grid²·patch]``: every image's patches side by side (NaViT packing)."""
    pixels = _pixels(images, 3, grid * patch, grid * patch)
    patches = torch.nn.functional.unfold(pixels, patch, stride=patch)  # [N, C·p·p, grid²]
    patches = patches.reshape(images, 3, patch, patch, -1).permute(0, 1, 2, 4, 3).reshape(images, 3, patch, -1)
    return torch.cat(list(patches), dim=-1)[None]


def _minicpm_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_navit_pixels(batch),
                         target_sizes=torch.tensor([[8, 8]] * batch, dtype=torch.int32))


# MiniCPM-V 4.7: the same, plus 3-D (temporal, height, width) positions for the image tokens, found
# from ``mm_token_type_ids`` and the ``<image>`` … ``</image>`` markers around them

_MINICPM_MARKERS = dict(image_start_id=246, image_end_id=247, slice_start_id=244, slice_end_id=245,
                        newline_id=243)


def _minicpmv4_7_config():
    return _minicpm_config("MiniCPMV4_7", "minicpmv4_7", **_MINICPM_MARKERS)


def _minicpmv4_7_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 16, [246], [247])
    ids, mask, mm_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types, pixel_values=_navit_pixels(batch),
                target_sizes=torch.tensor([[8, 8]] * batch, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# HunYuan-VL: flattened 8×8 patches of 4×4, merge 2 → a 4×4 grid, sent with a separator after each
# row and a boundary token at each end: 4·5 + 2 = 22 image tokens; 4-axis multimodal RoPE
# (sequence, width, height, image index)


def _hunyuan_vl_config():
    vision = tf_class("HunYuanVLVisionConfig", "hunyuan_vl")(
        patch_size=4, spatial_merge_size=2, out_hidden_size=64, text_hidden_size=64, num_key_value_heads=2,
        **VISION)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]}
    text = _text_config("HunYuanVLTextConfig", "hunyuan_vl", rope_parameters=rope)
    return tf_class("HunYuanVLConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE, im_start_id=246,
                                       im_end_id=247, im_newline_id=245)


def _hunyuan_vl_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 22)
    ids, mask, mm_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types,
                pixel_values=_pixels(batch * 64, 3 * 4 * 4), image_grid_thw=torch.tensor([[1, 8, 8]] * batch))


# ---------------------------------------------------------------------------------------------
# HY-V4-VL (Hy4): the HunYuan-VL vision tower (4×4 merged grid + a newline token per row = 20 image
# tokens) and a latent-attention decoder as Mistral Large 4's (indexer, latent KV cache), with
# hyper-connections and MoE (layer 0 dense, layer 1 sparse)


def _hy_v4_vl_config():
    vision = tf_class("HYV4VLVisionConfig", "hy_v4_vl")(
        patch_size=4, spatial_merge_size=2, out_hidden_size=64, num_key_value_heads=2, **VISION)
    mla = {k: v for k, v in _MLA.items() if k != "num_key_value_heads"}
    text = tf_class("HYV4VLTextConfig", "hy_v4_vl")(
        q_lora_rank=32, index_topk=8, index_head_dim=16, index_n_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}, **mla)
    return tf_class("HYV4VLConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=249)


def _hy_v4_vl_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 20)
    ids, mask, mm_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types,
                pixel_values=_pixels(batch * 64, 3 * 4 * 4), image_grid_thw=torch.tensor([[1, 8, 8]] * batch))


# ---------------------------------------------------------------------------------------------
# HyperCLOVA X Vision v2: the Qwen2.5-VL vision tower (32×32 image, patch 4, merge 2 → 16 tokens)
# and a HyperCLOVA X decoder (Granite-style multipliers, post-norms)


def _hyperclovax_vision_v2_config():
    vision = tf_class("Qwen2_5_VLVisionConfig", "qwen2_5_vl")(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    text = _text_config("HyperCLOVAXConfig", "hyperclovax", embedding_multiplier=2.0, logits_scaling=0.5,
                        residual_multiplier=0.5)
    return tf_class("HyperCLOVAXVisionV2Config")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                                 video_token_id=249)


def _hyperclovax_vision_v2_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch * 64, 3 * 2 * 4 * 4),
                         image_grid_thw=torch.tensor([[1, 8, 8]] * batch))


# ---------------------------------------------------------------------------------------------
# Inkling: one token per 2-frame 2×2 pixel patch (an 8×8 image → 16 tokens) from linear folds;
# decoder attention with short convolutions on Keys and Values (state in the cache), QK-norm and a
# learned relative-position bias; layer 0 sliding window (8), layer 1 global; MoE feed-forward


def _inkling_text():
    return _text_config("InklingTextConfig", "inkling", swa_num_attention_heads=4, swa_num_key_value_heads=2,
                        swa_head_dim=16, sliding_window_size=8, d_rel=4, rel_extent=64,
                        layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=32, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1)


def _inkling_config():
    # 3 folds: as many as the (t, h, w) scales of a 2-frame 2×2 patch (fewer need scipy's assignment solver)
    vision = tf_class("InklingVisionConfig", "inkling")(text_hidden_size=64, patch_size=2, temporal_patch_size=2,
                                                       hidden_size=32, num_hidden_layers=3)
    audio = tf_class("InklingAudioConfig", "inkling")(n_mel_bins=8, mel_vocab_size=16, text_hidden_size=64)
    return tf_class("InklingConfig")(text_config=_inkling_text(), vision_config=vision,
                                     audio_config=audio, image_token_id=IMAGE, audio_token_id=249,
                                     image_bos_token_id=246, audio_bos_token_id=247)


def _inkling_weights(model):
    # The random init leaves the relative-position bias and the short convolutions near zero, so a decode
    # step that dropped either would still match to 1e-4: give them trained-like magnitudes
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("rel_logits_proj.proj", "self_attn.r_proj.weight")) or "sconv.conv1d" in name:
                param.normal_(0.0, 0.5)


def _inkling_inputs(model, batch):
    return _image_inputs(batch, 16, [246], pixel_values=_pixels(batch * 16, 2, 2, 2, 3))


# Inkling 2 (and its looped variant): the same decoder family, without shared experts, with attention
# residual blocks (of 1 layer here); a ViT (patch 4, merge 2) reading one 8×8 pixel patch per token:
# a 4×4 token grid = 16 image tokens. The looped variant runs layer 1 twice per forward.


def _inkling2_text(module: str, prefix: str, **extra):
    return _text_config(f"{prefix}TextConfig", module, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                        swa_head_dim=16, sliding_window_size=8, d_rel=4, rel_extent=64, log_scaling_n_floor=8,
                        layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=32, n_routed_experts=4,
                        num_experts_per_tok=2, unpadded_vocab_size=VOCAB, n_layers_per_attn_res_block=1, **extra)


def _inkling2_config(module: str = "inkling2", prefix: str = "Inkling2", **loop):
    vision = tf_class("Inkling2VisionConfig", "inkling2")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, spatial_merge_size=2,
        posemb_grid_size=8, projection_hidden_dim=64, text_hidden_size=64)
    return tf_class(f"{prefix}Config")(text_config=_inkling2_text(module, prefix, **loop), vision_config=vision,
                                       image_token_id=IMAGE)


def _inkling2_loop_config():
    return _inkling2_config("inkling2_loop", "Inkling2Loop", loop_layer_index_start=1, loop_layer_index_end=2,
                            loop_num_passes=2, loop_gate_rank=8)


def _inkling2_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch * 16, 8, 8, 3).clamp(-1, 1),
                         image_grid_thw=torch.tensor([[1, 4, 4]] * batch))


# ---------------------------------------------------------------------------------------------
# Kimi K2.5: MoonViT (4×4 patches of a 32×32 image, merge 2×2 → 16 tokens) and a DeepSeek-V3
# decoder: the latent attention of Mistral 4 (latent cache); layer 0 dense, layer 1 MoE


def _kimi_k25_config():
    vision = tf_class("Kimi_K25VisionConfig", "kimi_k25")(patch_size=4, pos_emb_height=8, pos_emb_width=8,
                                                         **VISION)
    text = tf_class("DeepseekV3Config")(q_lora_rank=32, first_k_dense_replace=1, n_group=1, topk_group=1,
                                        num_mtp_layers=0, **_MLA)
    return tf_class("Kimi_K25Config")(vision_config=vision, text_config=text, projection_hidden_size=32,
                                      image_token_id=IMAGE, video_token_id=249, vision_start_token_id=246,
                                      vision_end_token_id=247)


def _kimi_k25_inputs(model, batch):
    return _image_inputs(batch, 16, [246], [247], pixel_values=_pixels(batch * 64, 3, 4, 4),
                         image_grid_thw=torch.tensor([[1, 8, 8]] * batch))


# ---------------------------------------------------------------------------------------------
# MiniMax-M3-VL: Qwen-style flattened patches (8×8 patches of 4×4, 2 frames), merge 2 → 16 tokens;
# decoder layer 0 block-sparse attention picked by a lightning indexer (blocks of 4 tokens, top 2
# plus the local block), layer 1 full attention; partial RoPE (8 of 16 channels); MoE


def _minimax_m3_vl_config():
    vision = tf_class("MiniMaxM3VLVisionConfig", "minimax_m3_vl")(image_size=32, patch_size=4, temporal_patch_size=2,
                                                                 spatial_merge_size=2, **VISION)
    text = _text_config("MiniMaxM3VLTextConfig", "minimax_m3_vl", num_local_experts=4, num_experts_per_tok=2,
                        dense_intermediate_size=128, shared_intermediate_size=32, rotary_dim=8, index_n_heads=2,
                        index_head_dim=16, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                        layer_types=["minimax_m3_sparse", "full_attention"])
    return tf_class("MiniMaxM3VLConfig")(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                         video_token_index=249, projector_hidden_size=64)


def _minimax_m3_vl_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch * 64, 3 * 2 * 4 * 4),
                         image_grid_thw=torch.tensor([[1, 8, 8]] * batch))


# ---------------------------------------------------------------------------------------------
# Muse Glimmer: flattened 8×8 patches of 4×4 (2 frames) on an 8×8 position grid, pixel shuffle 2 →
# 16 tokens; decoder layer 0 sliding window (8) with RoPE, layer 1 full attention without RoPE


def _muse_vision(module: str, prefix: str):
    return tf_class(f"{prefix}VisionConfig", module)(patch_size=4, pos_emb_height=8, pos_emb_width=8,
                                                     max_position_embeddings=64, merge_size=2, **VISION)


def _muse_glimmer_config():
    text = _text_config("MuseGlimmerTextConfig", "muse_glimmer", sliding_window=8)
    return tf_class("MuseGlimmerConfig")(vision_config=_muse_vision("muse_glimmer", "MuseGlimmer"), text_config=text,
                                         image_token_id=IMAGE, video_token_id=249, out_hidden_size=32 * 2 * 2,
                                         projector_hidden_size=64)


def _muse_inputs(model, batch):
    return _image_inputs(batch, 16, pixel_values=_pixels(batch * 64, 2 * 3 * 4 * 4),
                         image_grid_thw=torch.tensor([[1, 8, 8]] * batch))


# Muse Spark: the same vision tower and decoder pattern, MoE feed-forward (4 experts, 2 per token)
# and an audio encoder (built, unused)


def _muse_spark_config():
    text = _text_config("MuseSparkTextConfig", "muse_spark", sliding_window=8, moe_intermediate_size=32,
                        moe_hidden_size=32, num_local_experts=4, num_experts_per_tok=2)
    audio = tf_class("MuseSparkAudioConfig", "muse_spark")(patch_sizes=(2, 2), hidden_sizes=(16, 32), depths=(1, 1),
                                                           num_hidden_layers=2, out_hidden_size=64)
    return tf_class("MuseSparkConfig")(vision_config=_muse_vision("muse_spark", "MuseSpark"), text_config=text,
                                       audio_config=audio, image_token_id=IMAGE, video_token_id=249,
                                       audio_token_id=248, out_hidden_size=32 * 2 * 2, projector_hidden_size=64)


# ---------------------------------------------------------------------------------------------

MODELS: list[TinyModel] = [
    TinyModel("llava_next_video", _llava_next_video_config, LazyClass("LlavaNextVideoForConditionalGeneration"),
              _anyres_inputs, full_attention=2),
    TinyModel("llava_onevision", _llava_onevision_config, LazyClass("LlavaOnevisionForConditionalGeneration"),
              _anyres_inputs, full_attention=2),
    TinyModel("mistral3", _mistral3_config, LazyClass("Mistral3ForConditionalGeneration"), _pixtral_inputs,
              full_attention=2),
    TinyModel("lighton_ocr", _lighton_ocr_config, LazyClass("LightOnOcrForConditionalGeneration"), _pixtral_inputs,
              full_attention=2),
    TinyModel("internvl", _internvl_config, LazyClass("InternVLForConditionalGeneration"), _internvl_inputs,
              full_attention=2),
    TinyModel("idefics2", _idefics2_config, LazyClass("Idefics2ForConditionalGeneration"), _idefics2_inputs,
              full_attention=2),
    TinyModel("granite_docling", _granite_docling_config, LazyClass("GraniteDoclingForConditionalGeneration"),
              _granite_docling_inputs, full_attention=2),
    TinyModel("lfm2_vl", _lfm2_vl_config, LazyClass("Lfm2VlForConditionalGeneration"), _naflex_inputs,
              full_attention=1),
    TinyModel("lfm3_vl", _lfm3_vl_config, LazyClass("Lfm3VlForConditionalGeneration"), _lfm3_vl_inputs,
              full_attention=1, skipped=("layers.1.self_attn",)),
    TinyModel("janus", _janus_config, LazyClass("JanusForConditionalGeneration"), _janus_inputs, full_attention=2),
    TinyModel("instructblip", _instructblip_config, LazyClass("InstructBlipForConditionalGeneration"),
              _instructblip_inputs, full_attention=2),
    TinyModel("instructblipvideo", _instructblipvideo_config, LazyClass("InstructBlipVideoForConditionalGeneration"),
              _instructblipvideo_inputs, full_attention=2),
    TinyModel("idefics", _idefics_config, LazyClass("IdeficsForVisionText2Text"), _idefics_inputs,
              full_attention=2, skipped=("gated_cross_attn_layers.0",), has_image=False),
    TinyModel("kosmos-2", _kosmos2_config, LazyClass("Kosmos2ForConditionalGeneration"), _kosmos2_inputs,
              full_attention=2),
    TinyModel("kosmos-2.5", _kosmos2_5_config, LazyClass("Kosmos2_5ForConditionalGeneration"), _kosmos2_5_inputs,
              full_attention=2),
    TinyModel("mistral4", _mistral4_config, LazyClass("Mistral4ForCausalLM"), _text_inputs, full_attention=2,
              has_image=False),
    TinyModel("mistral_large4", _mistral_large4_config, LazyClass("MistralLarge4ForConditionalGeneration"),
              _pixtral_inputs, full_attention=2),
    TinyModel("molmo2", _molmo2_config, LazyClass("Molmo2ForConditionalGeneration"), _molmo2_inputs,
              full_attention=2),
    TinyModel("minicpm_ocr", _minicpm_ocr_config, LazyClass("MiniCPMOcrForConditionalGeneration"), _minicpm_inputs,
              full_attention=1),
    TinyModel("minicpmv4_6", _minicpmv4_6_config, LazyClass("MiniCPMV4_6ForConditionalGeneration"), _minicpm_inputs,
              full_attention=1),
    TinyModel("minicpmv4_7", _minicpmv4_7_config, LazyClass("MiniCPMV4_7ForConditionalGeneration"),
              _minicpmv4_7_inputs, full_attention=1),
    TinyModel("hunyuan_vl", _hunyuan_vl_config, LazyClass("HunYuanVLForConditionalGeneration"), _hunyuan_vl_inputs,
              full_attention=2),
    TinyModel("hy_v4_vl", _hy_v4_vl_config, _EagerOnly("HYV4VLForConditionalGeneration"), _hy_v4_vl_inputs,
              full_attention=2),
    TinyModel("hyperclovax_vision_v2", _hyperclovax_vision_v2_config,
              LazyClass("HyperCLOVAXVisionV2ForConditionalGeneration"), _hyperclovax_vision_v2_inputs,
              full_attention=2),
    TinyModel("inkling_mm_model", _inkling_config, LazyClass("InklingForConditionalGeneration"), _inkling_inputs,
              full_attention=1, skipped=("layers.0.self_attn",), prepare=_inkling_weights),
    TinyModel("inkling2", _inkling2_config, _EagerOnly("Inkling2ForConditionalGeneration"), _inkling2_inputs,
              full_attention=1, skipped=("layers.0.self_attn",), prepare=_inkling_weights),
    TinyModel("inkling2_loop", _inkling2_loop_config, _EagerOnly("Inkling2LoopForConditionalGeneration"),
              _inkling2_inputs, full_attention=1, skipped=("layers.0.self_attn",), prepare=_inkling_weights),
    TinyModel("kimi_k25", _kimi_k25_config, LazyClass("Kimi_K25ForConditionalGeneration"), _kimi_k25_inputs,
              full_attention=2),
    TinyModel("minimax_m3_vl", _minimax_m3_vl_config, LazyClass("MiniMaxM3SparseForConditionalGeneration"),
              _minimax_m3_vl_inputs, full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("muse_glimmer", _muse_glimmer_config, LazyClass("MuseGlimmerForConditionalGeneration"), _muse_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("muse_spark", _muse_spark_config, LazyClass("MuseSparkForConditionalGeneration"), _muse_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
]

_AUDIO_ONLY = "audio-only: speech in, text out, no image input"

NOT_BUILDABLE: dict[str, str] = {
    "granite_speech": _AUDIO_ONLY,
    "granite_speech_plus": _AUDIO_ONLY,
    "kyutai_speech_to_text": _AUDIO_ONLY,
    "moss_transcribe_diarize": _AUDIO_ONLY,
    "llama4": ("transformers 5.24: Llama4ForConditionalGeneration.forward reads `outputs.image_outputs`, which its "
               "language model's MoeCausalLMOutputWithPast lacks (AttributeError, uncompiled too)"),
}

# Causes shared by several classes
_INNER_GENERATE = ("its generate() merges the image in eager code, then calls the inner language model's "
                   "generate(), which model.compile() does not reach: nothing is compiled or compressed, and one "
                   "WARNING says so (tests/test_generate_check.py). Compiling model.language_model instead "
                   "compresses the prompt span, not the image tokens alone (the merge happens before it)")
_LATENT_CACHE = ("multi-head latent attention caches the latent and expands per-head Keys after the cache read: "
                 "left exact, reported as 'multi-head latent attention … (not supported)' with a WARNING, "
                 "nothing compressed")
_SINKS_UNSEEN = ("eager attention with an added position bias and sink logits (softmax over cat(logits, sinks), "
                 "then [..., :-1]) is not matched: the decoder's self-attention layers, which write a KV cache, "
                 "are left exact and reported ('no attention the pass recognises reads it') with a WARNING")
_LATENT_SINKS = ("multi-head latent attention with sink logits: no attention the pass matches reads its KV cache; "
                 "the layers are left exact and reported ('it writes a KV cache, but no attention the pass "
                 "recognises reads it') with a WARNING, nothing compressed")

KNOWN_GAPS: dict[str, dict[str, str]] = {
    "sites": {
        "granite_docling": ("DeepStack's boolean-index add after decoder layer 0 breaks the graph inside the layer "
                            "loop: each decoder layer is a prefill graph of its own, named 'self_attn'"),
        "instructblip": _INNER_GENERATE,
        "instructblipvideo": _INNER_GENERATE,
        "kosmos-2": _INNER_GENERATE,
        "mistral4": _LATENT_CACHE,
        "mistral_large4": _LATENT_CACHE,
        "kimi_k25": _LATENT_CACHE,
        "hy_v4_vl": _LATENT_SINKS,
        "inkling2": _SINKS_UNSEEN,
        "inkling2_loop": _SINKS_UNSEEN,
        "inkling_mm_model": ("the check reads layer_types[i] == 'full_attention'; Inkling names its global layers "
                             "'hybrid' (the check's naming, not the product)"),
    },
    "span": {
        "granite_docling": ("the image mask is tagged on the merged embeddings, but the text model scales them "
                            "(embedding multiplier) outside any graph and each layer runs in its own graph: no "
                            "span reaches the prefill graphs (empty span: the layers stay exact, Key bytes 1.00×)"),
        "instructblip": _INNER_GENERATE,
        "instructblipvideo": _INNER_GENERATE,
        "kosmos-2": _INNER_GENERATE,
        "molmo2": ("Dynamo breaks the graph at the masked_scatter whose source is a boolean gather "
                   "(embeds[mask] + features): the merge runs outside every graph, no span is found"),
        "mistral4": _LATENT_CACHE,
        "mistral_large4": _LATENT_CACHE,
        "kimi_k25": _LATENT_CACHE,
        "hy_v4_vl": _LATENT_SINKS,
        "inkling2": _SINKS_UNSEEN,
        "inkling2_loop": _SINKS_UNSEEN,
        "inkling_mm_model": ("its global layers' masks carry a learned relative-position bias: left exact with a "
                             "WARNING (not supported), so no span is compressed"),
    },
}
