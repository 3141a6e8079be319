"""Tiny models, part a of the VLM class registry (see :mod:`tests.vlm_classes`).

Every decoder follows ``tests/tiny_models.py``: 2 layers (sliding-window models: one sliding +
one full), hidden 64, 4 query / 2 KV heads, head_dim 16, vocabulary 256, fp32; vision towers of
1–2 layers; 16 image tokens (``IMAGE``) per row, batch rows as ``_image_rows`` lays them out.
Classes and configs that older transformers releases lack are looked up by name at build time
(:mod:`tests.vlm_classes.common`).
"""

from __future__ import annotations

import torch
import transformers as tf

from tests.tiny_models import (
    _BOI, _EOI, _VISION_END, _VISION_START, BOS, DECODER, IMAGE, TEXT_ROWS, VISION, TinyModel, _image_rows, _left_pad, _pixels,
    _qwen_inputs, _siglip, _text)
from tests.vlm_classes.common import LazyClass, tf_class

_NO_HEAD_DIM = {k: v for k, v in DECODER.items() if k != "head_dim"}


def _image_inputs(tokens: int, *, before=(), after=(), **image):
    """``make_inputs`` for a prompt with ``tokens`` image placeholders and the image kwargs given
    as ``name=lambda batch: tensor``."""

    def make(model, batch):
        rows, _ = _image_rows(batch, [IMAGE] * tokens, before, after)
        ids, mask = _left_pad(rows)
        return dict(input_ids=ids, attention_mask=mask, **{k: f(batch) for k, f in image.items()})

    return make


def _sliding_full():
    return dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8)


# ---------------------------------------------------------------------------------------------
# Aya Vision / Cohere2-Vision: SigLIP 32×32, patch 4 → 8×8, pixel shuffle ×2 → 16 tokens;
# Cohere2 decoder: layer 0 sliding (window 8), layer 1 full


def _cohere2_text():
    return dict(model_type="cohere2", num_hidden_layers=2, **_NO_HEAD_DIM, **_sliding_full())


def _aya_vision_config():
    return tf_class("AyaVisionConfig")(vision_config=_siglip(32, 4), text_config=_cohere2_text(),
                                       image_token_index=IMAGE, downsample_factor=2,
                                       vision_feature_layer=-1, vision_feature_select_strategy="full")


def _cohere2_vision_config():
    return tf_class("Cohere2VisionConfig")(vision_config=_siglip(32, 4), text_config=_cohere2_text(),
                                           image_token_id=IMAGE, downsample_factor=2,
                                           alignment_intermediate_size=64)


# ---------------------------------------------------------------------------------------------
# DeepSeek-VL: SigLIP 16×16, patch 4 → 16 tokens; Llama decoder


def _deepseek_vl_config():
    return tf_class("DeepseekVLConfig")(vision_config=_siglip(16, 4),
                                        text_config=dict(model_type="llama", num_hidden_layers=2, **DECODER),
                                        image_token_id=IMAGE)


# ---------------------------------------------------------------------------------------------
# DeepSeek-VL-Hybrid: SigLIP 16×16 / 4 → 16 tokens, joined with a SAM tower on 32×32 (patch 4, 8×8,
# interpolated to 16×16, two stride-2 convs → 4×4)


def _sam(config_name: str, module: str = ""):
    return tf_class(config_name, module)(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=4, window_size=4, global_attn_indexes=[1],
                                         mlp_dim=64)


def _deepseek_vl_hybrid_config():
    return tf_class("DeepseekVLHybridConfig")(
        vision_config=_siglip(16, 4), high_res_vision_config=_sam("SamVisionConfig"),
        text_config=dict(model_type="llama", num_hidden_layers=2, **DECODER), image_token_id=IMAGE)


# ---------------------------------------------------------------------------------------------
# GOT-OCR2: SAM-style tower 64×64 / 4 → 16×16, two stride-2 convs → 4×4 = 16 tokens; Qwen2 decoder


def _got_ocr2_config():
    vision = tf_class("GotOcr2VisionConfig", "got_ocr2")(
        hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
        patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64)
    return tf_class("GotOcr2Config")(vision_config=vision, image_token_index=IMAGE, image_seq_length=16,
                                     text_config=dict(model_type="qwen2", num_hidden_layers=2, **DECODER))


# ---------------------------------------------------------------------------------------------
# FastVLM: its FastViT tower is a timm model (timm is not a dependency); a 2-stage ResNet stands in
# (same [B, C, H, W] output): 32×32 → stride 8 → 4×4 = 16 tokens. Qwen2 decoder.


def _fast_vlm_config():
    vision = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], hidden_size=32,
                             layer_type="basic")
    return tf_class("FastVlmConfig")(vision_config=vision, image_token_index=IMAGE, image_seq_length=16,
                                     text_config=dict(model_type="qwen2", num_hidden_layers=2, **DECODER))


# ---------------------------------------------------------------------------------------------
# Aria: Idefics3 tower 32×32 / 4 → 64 patches, cross-attention projector to 16 queries; MoE decoder


def _aria_config():
    from tests.tiny_models import _idefics3_vision

    text = tf_class("AriaTextConfig", "aria")(num_hidden_layers=2, moe_num_experts=4, moe_topk=2,
                                              moe_num_shared_experts=1, **DECODER)
    return tf_class("AriaConfig")(vision_config=_idefics3_vision(tf_class("Idefics3VisionConfig", "idefics3")),
                                  text_config=text, image_token_index=IMAGE,
                                  projector_patch_to_query_dict={64: 16})


# ---------------------------------------------------------------------------------------------
# GLM-4V family (GLM-4.1V, GLM-4.6V, GLM-OCR, GLM-4.5V MoE): Qwen2-VL-style tower, 32×32 / patch 4
# → 8×8, merge 2×2 → 16 tokens between image start/end tokens; M-RoPE on half the head
# (partial_rotary_factor 0.5: 8 of 16 channels, sections [2, 1, 1]). Inputs: ``_qwen_inputs``.

_GLM_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
             "partial_rotary_factor": 0.5}
_GLM_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, image_size=32, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64)


def _glm_config(config: str, vision: dict, text: dict):
    return tf_class(config)(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=247,
                            image_start_token_id=_VISION_START, image_end_token_id=_VISION_END)


def _glm_text(model_type: str, **extra):
    return dict(model_type=model_type, num_hidden_layers=2, rope_parameters=dict(_GLM_ROPE), **_NO_HEAD_DIM, **extra)


def _glm4v_config():
    return _glm_config("Glm4vConfig", dict(model_type="glm4v_vision", **_GLM_VISION), _glm_text("glm4v_text"))


def _glm46v_config():
    return _glm_config("Glm46VConfig", dict(model_type="glm4v_vision", **_GLM_VISION), _glm_text("glm4v_text"))


def _glmga_config():
    return _glm_config("GlmgaConfig", dict(model_type="glm4v_vision", **_GLM_VISION), _glm_text("glm4v_text"))


def _glm_ocr_config():
    return _glm_config("GlmOcrConfig", dict(model_type="glm_ocr_vision", **_GLM_VISION), _glm_text("glm_ocr_text"))


def _glm4v_moe_config():
    # layer 0 dense MLP, layer 1 MoE: 4 routed experts, top 2, one shared
    moe = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
               first_k_dense_replace=1)
    return _glm_config("Glm4vMoeConfig", dict(model_type="glm4v_moe_vision", **_GLM_VISION),
                       _glm_text("glm4v_moe_text", **moe))


# ---------------------------------------------------------------------------------------------
# Gemma 4: vision tower on 8×8 patches of 4×4 pixels (given as [B, 64, 48] with (x, y) positions),
# pooled 2×2 → 16 tokens between BOI/EOI; decoder layer 0 sliding (window 8), layer 1 full (its
# "global" head_dim also 16), per-layer inputs (PLE) of width 16


def _gemma4_vision(config: str = "Gemma4VisionConfig", **extra):
    return tf_class(config)(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                            position_embedding_size=64, **extra)


def _gemma4_text(config: str = "Gemma4TextConfig", **extra):
    return tf_class(config)(num_hidden_layers=2, global_head_dim=16, vocab_size_per_layer_input=256,
                            hidden_size_per_layer_input=16, **_sliding_full(), **DECODER, **extra)


_GEMMA4_TOKENS = dict(boi_token_id=_BOI, eoi_token_id=_EOI, image_token_id=IMAGE, video_token_id=245,
                      boa_token_id=244, eoa_token_index=243, audio_token_id=242)


def _gemma4_config():
    return tf_class("Gemma4Config")(text_config=_gemma4_text(), vision_config=_gemma4_vision(), audio_config=None,
                                    **_GEMMA4_TOKENS)


def _gemma4_patches(batch: int, side: int = 8, patch: int = 4) -> dict:
    """``pixel_values`` ``[B, side², 3·patch²]`` in [0, 1] and their (x, y) ``image_position_ids``."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # [side², 2]
    return dict(pixel_values=torch.rand(batch, side * side, 3 * patch * patch),
                image_position_ids=positions.expand(batch, -1, -1).clone())


def _gemma4_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 16, [_BOI], [_EOI])
    ids, mask, mm_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types, **_gemma4_patches(batch))


# Gemma 4 unified: no vision tower; 4×4 "model patches" of 8×8 pixels (patch 4, merge 2) embedded
# directly → 16 tokens; image tokens attend bidirectionally (use_bidirectional_attention="vision")


def _gemma4_unified_config():
    text = tf_class("Gemma4UnifiedTextConfig")(num_hidden_layers=2, global_head_dim=16, **_sliding_full(), **DECODER)
    vision = tf_class("Gemma4UnifiedVisionConfig")(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32,
                                                   mm_posemb_size=16, output_proj_dims=32)
    return tf_class("Gemma4UnifiedConfig")(text_config=text, vision_config=vision, audio_config=None,
                                           **_GEMMA4_TOKENS)


def _gemma4_unified_inputs(model, batch):
    rows, types = _image_rows(batch, [IMAGE] * 16, [_BOI], [_EOI])
    ids, mask, mm_types = _left_pad(rows, types)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types,
                **_gemma4_patches(batch, side=4, patch=8))


# ---------------------------------------------------------------------------------------------
# Chameleon: a VQ-VAE turns a 16×16 image into 4×4 = 16 codes (2 downsamplings), mapped to BPE
# tokens 200–215 and embedded like text


_VQ_CODES = 16
_VQ_FIRST = 200


def _vq_name(code: int) -> str:
    """Chameleon's BPE name of a VQ code: digits as letters A–J, wrapped in IMGIMG…Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def _chameleon_config():
    vq = tf_class("ChameleonVQVAEConfig", "chameleon")(
        embed_dim=16, num_embeddings=_VQ_CODES, latent_channels=32, resolution=16, base_channels=32,
        channel_multiplier=[1, 1, 2], num_res_blocks=1)
    vocabulary = {"<image>": IMAGE, **{_vq_name(c): _VQ_FIRST + c for c in range(_VQ_CODES)}}
    return tf_class("ChameleonConfig")(num_hidden_layers=2, vq_config=vq, vocabulary_map=vocabulary, **DECODER)


# Emu3: a VQ-VAE (2 spatial downsamplings, f = 4) turns a 16×12 image into 4×3 codes; each row of
# codes ends with an end-of-line token: 4 × (3 + 1) = 16 tokens. Codes → BPE tokens 200–215, EOL 216


def _emu3_config():
    vq = tf_class("Emu3VQVAEConfig", "emu3")(
        codebook_size=_VQ_CODES, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1],
        num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=2, hidden_size=32, num_attention_heads=1)
    vocabulary = {"<image>": IMAGE, "<|extra_200|>": _VQ_FIRST + _VQ_CODES,
                  **{f"<|visual token{c:06d}|>": _VQ_FIRST + c for c in range(_VQ_CODES)}}
    text = tf_class("Emu3TextConfig", "emu3")(num_hidden_layers=2, attention_dropout=0.0, **DECODER)
    return tf_class("Emu3Config")(vq_config=vq, text_config=text, vocabulary_map=vocabulary)


# ---------------------------------------------------------------------------------------------
# Fuyu: no vision tower, 16 patches of 4×4 pixels linearly embedded; Persimmon decoder (MHA)


def _fuyu_config():
    return tf_class("FuyuConfig")(patch_size=4, image_size=16, image_token_id=IMAGE,
                                  text_config=dict(model_type="persimmon", num_hidden_layers=2, **_NO_HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# BLIP-2: BLIP vision 16×16 / 4, a 1-layer Q-Former with 16 queries → 16 image tokens; Llama
# decoder. Its generate() merges the image itself and calls the inner language model's generate().


def _blip_2_config():
    vision = tf_class("Blip2VisionConfig")(image_size=16, patch_size=4, **VISION)
    qformer = tf_class("Blip2QFormerConfig")(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, encoder_hidden_size=32, vocab_size=256)
    return tf_class("Blip2Config")(vision_config=vision, qformer_config=qformer, num_query_tokens=16,
                                   text_config=dict(model_type="llama", num_hidden_layers=2, **DECODER),
                                   image_token_index=IMAGE)


# BLIP: BLIP vision 16×16 / 4; a BERT-style text decoder that reads the image through
# cross-attention (no image placeholders: the span is the prompt's head); generate() calls the text
# decoder's own generate()


def _blip_config():
    text = tf_class("BlipTextConfig")(vocab_size=256, hidden_size=64, encoder_hidden_size=32, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, sep_token_id=251)
    return tf_class("BlipConfig")(text_config=text, vision_config=tf_class("BlipVisionConfig")(
        image_size=16, patch_size=4, **VISION))


def _text_inputs(**image):
    def make(model, batch):
        ids, mask = _left_pad([[BOS] + _text(n - 1) for n in TEXT_ROWS[batch]])
        return dict(input_ids=ids, attention_mask=mask, **{k: f(batch) for k, f in image.items()})

    return make


# GIT: CLIP-style vision 16×16 / 4 (16 patches + CLS), projected and concatenated in front of the
# text embeddings (no placeholder tokens: the span is the prompt's head); BERT-style decoder


def _git_config():
    vision = tf_class("GitVisionConfig", "git")(image_size=16, patch_size=4, **VISION)
    return tf_class("GitConfig")(vision_config=vision, vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, bos_token_id=1, eos_token_id=2)


# Florence-2: encoder-decoder (BART). DaViT vision 32×32, two stages (stride 4, 2) → 4×4 + 1 pooled
# = 17 image tokens merged into the *encoder* input; the decoder's self-attention cache holds
# generated tokens only


def _florence2_config():
    vision = tf_class("Florence2VisionConfig", "florence2")(
        depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
        embed_dim=[32, 64], num_heads=[2, 4], num_groups=[2, 4], window_size=2, drop_path_rate=0.0,
        projection_dim=64, max_position_embeddings=16)
    text = dict(model_type="bart", vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=2, forced_eos_token_id=None)
    return tf_class("Florence2Config")(vision_config=vision, text_config=text, image_token_id=IMAGE)


# Apertus 1.5: an IBQ vision tokenizer (f = 4) turns a 16×16 image into 4×4 codes, offset to
# tokens 200–215 and embedded like text; a small WavTokenizer stands in the (unused) audio slot


def _apertus1p5_config():
    vision = tf_class("Apertus1p5VisionTokenizerConfig", "apertus1p5")(
        codebook_size=_VQ_CODES, embed_dim=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
        num_res_blocks=1, attn_resolutions=[], resolution=16)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=8, upsampling_ratios=[2, 2], hidden_size=16,
                 codebook_size=_VQ_CODES, codebook_dim=16, num_lstm_layers=1)
    text = tf_class("Apertus1p5TextConfig", "apertus1p5")(  # llama3 RoPE: positions up to its 8192
        num_hidden_layers=2, **{**DECODER, "max_position_embeddings": 16384})
    return tf_class("Apertus1p5Config")(text_config=text, vision_config=vision, audio_config=audio,
                                        image_token_id=IMAGE, audio_token_id=249, image_token_offset=_VQ_FIRST,
                                        audio_token_offset=_VQ_FIRST + _VQ_CODES)


# ---------------------------------------------------------------------------------------------
# Cohere Compass: Qwen3-VL-style tower (32×32 / 4 → 8×8, merge 2×2 → 16 tokens) with one DeepStack
# feature added to the image positions after decoder layer 0; interleaved M-RoPE. Inputs:
# ``_qwen_inputs``.


def _cohere_compass_config():
    vision = tf_class("CohereCompassVisionConfig", "cohere_compass")(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
    text = tf_class("CohereCompassTextConfig", "cohere_compass")(
        num_hidden_layers=2, rope_parameters={"full_attention": rope}, **_NO_HEAD_DIM)
    return tf_class("CohereCompassConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                           video_token_id=247, vision_start_token_id=_VISION_START,
                                           vision_end_token_id=_VISION_END)


# Cosmos3-Edge: SigLIP2-style packed patches (64 patches of 4×4, no temporal patch) merged 2×2 by
# the projector → 16 tokens; M-RoPE (sections [4, 2, 2] of the 8 frequencies)


def _cosmos3_edge_config():
    vision = tf_class("Cosmos3EdgeVisionConfig", "cosmos3_edge")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
        num_patches=64, spatial_merge_size=2)
    text = tf_class("Cosmos3EdgeTextConfig", "cosmos3_edge")(
        num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 2, 2]}, **DECODER)
    return tf_class("Cosmos3EdgeConfig")(vision_config=vision, text_config=text, projector_hidden_size=64,
                                         image_token_id=IMAGE, video_token_id=247,
                                         vision_start_token_id=_VISION_START, vision_end_token_id=_VISION_END)


def _packed_qwen_inputs(channels_per_patch: int):
    """``_qwen_inputs`` with ``pixel_values`` ``[B·64, channels_per_patch]``."""

    def make(model, batch):
        inputs = _qwen_inputs(model, batch)
        inputs["pixel_values"] = _pixels(inputs["pixel_values"].shape[0], channels_per_patch)
        return inputs

    return make


# Cosmos3-Omni: Qwen3-VL tower and decoder (DeepStack after layer 0, interleaved M-RoPE)


def _cosmos3_omni_config():
    vision = dict(model_type="qwen3_vl_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    text = dict(model_type="qwen3_vl_text", num_hidden_layers=2, **DECODER,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    return tf_class("Cosmos3OmniConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                         video_token_id=247, vision_start_token_id=_VISION_START,
                                         vision_end_token_id=_VISION_END)


# ---------------------------------------------------------------------------------------------
# DeepSeek-OCR-2: SAM tower 32×32 / 4 → 8×8, two stride-2 convs → 2×2; a Qwen2-style encoder reads
# those 4 patches and its fixed 144 learned queries (12×12, the checkpoint's smallest set): 144 query
# tokens + 1 view separator = 145 image tokens. Decoder: layer 0 dense, layer 1 MoE (greedy top 2 of 4)


def _deepseek_ocr2_config():
    sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=4, window_size=4, global_attn_indexes=[1], downsample_channels=[32, 64])
    encoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)
    vision = tf_class("DeepseekOcr2VisionConfig", "deepseek_ocr2")(sam_config=sam, encoder_config=encoder)
    text = tf_class("DeepseekOcr2TextConfig", "deepseek_ocr2")(
        num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        mlp_layer_types=["dense", "sparse"], **_NO_HEAD_DIM)
    return tf_class("DeepseekOcr2Config")(vision_config=vision, text_config=text, image_token_id=IMAGE)


# EXAONE 4.5: Qwen2.5-VL-style windowed tower (GQA), 32×32 / 4 → 8×8, merge 2×2 → 16 tokens;
# EXAONE 4 decoder with 1-D RoPE, layer 0 sliding (window 8), layer 1 full


def _exaone4_5_config():
    vision = tf_class("Exaone4_5_VisionConfig", "exaone4_5")(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_key_value_heads=1, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64, fullatt_block_indexes=[1])
    text = dict(model_type="exaone4", num_hidden_layers=2, **_sliding_full(), **DECODER)
    return tf_class("Exaone4_5_Config")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                        video_token_id=247)


def _without(make_inputs, *names: str):
    """``make_inputs`` minus the keyword arguments ``names`` (a model that takes no token types)."""

    def make(model, batch):
        inputs = make_inputs(model, batch)
        for name in names:
            inputs.pop(name)
        return inputs

    return make


# dots3-note: 32×32 / 4 → 8×8 patches, merged 2×2 → 16 tokens (no temporal patch; dense vision
# MLPs); decoder with multi-head latent attention (q/kv LoRA, 8 + 8 nope/rope channels: head_dim 16),
# both layers full attention, layer 1 MoE; a 1-layer audio encoder fills the (unused) audio slot


def _dots3_note_config():
    vision = tf_class("Dots3NoteVisionConfig", "dots3_note")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
        spatial_merge_size=2, pyramid_num_routed=[-1, -1], adapter_in_dim=32, adapter_out_dim=64, adapter_merge_size=2)
    audio = tf_class("Dots3NoteAudioConfig", "dots3_note")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, feature_size=16,
        downsample_hidden_size=16, adapter_input_size=32, adapter_out_dim=64)
    text = tf_class("Dots3NoteTextConfig", "dots3_note")(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, moe_intermediate_size=32, shared_experts_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"], layer_types=["full_attention"] * 2,
        use_dsa=False, use_sliding_window=False, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    return tf_class("Dots3NoteConfig")(text_config=text, vision_config=vision, audio_config=audio,
                                       image_token_id=IMAGE, video_token_id=247, audio_token_id=244)


# ERNIE 4.5-VL MoE: 32×32 / 4 → 8×8 patches, merged 2×2 → 16 tokens; 3-D RoPE (sections [3, 3, 2]);
# layer 0 dense, layer 1 modality-routed MoE (text and vision experts)


def _ernie4_5_vl_moe_config():
    vision = dict(model_type="ernie4_5_vl_moe_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  patch_size=4, spatial_merge_size=2, temporal_merge_size=2)
    text = dict(model_type="ernie4_5_vl_moe_text", num_hidden_layers=2, moe_intermediate_size=[32, 32], moe_k=2,
                moe_num_experts=4, moe_num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
                **DECODER)
    return tf_class("Ernie4_5_VLMoeConfig")(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                            image_start_token_id=_VISION_START, image_end_token_id=_VISION_END,
                                            video_token_id=247, video_start_token_id=246, video_end_token_id=245)


# GLM-5-Next: GLM-4V-style tower (32×32 / 4, merge 2×2 → 16 tokens); decoder layer 0 linear
# attention (KDA), layer 1 indexed (DSA) multi-head latent attention without RoPE (16 nope channels);
# both dense MLPs; hyper-connections ×2


def _glm5_next_config():
    vision = dict(model_type="glm5_next_vision", projection_intermediate_size=64, **_GLM_VISION)
    text = dict(model_type="glm5_next_text", vocab_size=256, hidden_size=64, intermediate_size=128,
                moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=0,
                qk_nope_head_dim=16, v_head_dim=16, index_topk=64, index_head_dim=16, index_n_heads=2,
                layer_types=["linear_attention", "indexed_attention"], mlp_layer_types=["dense", "dense"],
                linear_head_dim=16, linear_num_heads=4, hc_mult=2, max_position_embeddings=512, pad_token_id=0)
    return _glm_config("Glm5NextConfig", vision, text)


# ---------------------------------------------------------------------------------------------
# Granite 4 Vision: LLaVA-NeXT anyres (a 16×32 image: 1 base + 2 tiles of 16×16, CLIP patch 4 →
# 4×4 per tile), window Q-Former projectors (downsample 1/2); every feature is injected *inside* the
# decoder (DeepStack): one vision layer at decoder layer 0, the 4 spatial groups at layer 1


def _granite4_vision_config():
    vision = tf.CLIPVisionConfig(image_size=16, patch_size=4, projection_dim=64, hidden_size=64, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2)
    text = tf_class("Granite4VisionTextConfig", "granite4_vision")(num_hidden_layers=2, **_NO_HEAD_DIM)
    return tf_class("Granite4VisionConfig")(
        vision_config=vision, text_config=text, image_token_index=IMAGE, image_grid_pinpoints=[[16, 32], [32, 16]],
        downsample_rate="1/2", deepstack_layer_map=[[-2, 0]], spatial_vision_layer=-1,
        spatial_target_layers=[1, 1, 1, 1], qformer_config=dict(intermediate_size=64), projector_dropout=0.0)


# base tile: 4×4 patches → 2×2; the 16×32 image's 2 tiles → 2×4, one newline per row: 4 + 2·(4 + 1)
_GRANITE4_TOKENS = 14
_granite4_vision_inputs = _image_inputs(_GRANITE4_TOKENS, pixel_values=lambda b: _pixels(b, 3, 3, 16, 16),
                                        image_sizes=lambda b: torch.tensor([[16, 32]] * b))


# ---------------------------------------------------------------------------------------------
# Evolla: a protein sequence (SaProt encoder, 12 residues) read through a resampler and
# cross-attention adapters in the Llama decoder; no placeholder tokens: the span is the prompt's head


def _evolla_config():
    protein = dict(vocab_size=446, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf_class("EvollaConfig")(
        protein_encoder_config=protein, num_hidden_layers=2, aligner_num_add_layers=1, resampler_depth=1,
        resampler_dim_head=16, resampler_heads=2, resampler_num_latents=16, aligner_attention_probs_dropout_prob=0.0,
        use_cache=True, **DECODER)


def _evolla_inputs(model, batch):
    inputs = _text_inputs()(model, batch)
    residues = torch.randint(5, 446, (batch, 12))
    return dict(inputs, protein_input_ids=residues, protein_attention_mask=torch.ones_like(residues))


MODELS: list[TinyModel] = [
    TinyModel("aya_vision", _aya_vision_config, LazyClass("AyaVisionForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 32, 32)), full_attention=1,
              skipped=("layers.0.self_attn",)),
    TinyModel("cohere2_vision", _cohere2_vision_config, LazyClass("Cohere2VisionForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 32, 32)), full_attention=1,
              skipped=("layers.0.self_attn",)),
    TinyModel("deepseek_vl", _deepseek_vl_config, LazyClass("DeepseekVLForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 16, 16)), full_attention=2),
    TinyModel("deepseek_vl_hybrid", _deepseek_vl_hybrid_config, LazyClass("DeepseekVLHybridForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 16, 16),
                            high_res_pixel_values=lambda b: _pixels(b, 3, 32, 32)), full_attention=2),
    TinyModel("got_ocr2", _got_ocr2_config, LazyClass("GotOcr2ForConditionalGeneration", eager=("", "vision_config")),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 64, 64)), full_attention=2),
    TinyModel("fast_vlm", _fast_vlm_config, LazyClass("FastVlmForConditionalGeneration", eager=("vision_config",)),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 32, 32)), full_attention=2),
    TinyModel("glm4v", _glm4v_config, LazyClass("Glm4vForConditionalGeneration"), _qwen_inputs, full_attention=2),
    TinyModel("glm46v", _glm46v_config, LazyClass("Glm46VForConditionalGeneration"), _qwen_inputs, full_attention=2),
    TinyModel("glmga", _glmga_config, LazyClass("Glm46VForConditionalGeneration"), _qwen_inputs, full_attention=2),
    TinyModel("glm_ocr", _glm_ocr_config, LazyClass("GlmOcrForConditionalGeneration"), _qwen_inputs, full_attention=2),
    TinyModel("glm4v_moe", _glm4v_moe_config, LazyClass("Glm4vMoeForConditionalGeneration"), _qwen_inputs,
              full_attention=2),
    TinyModel("gemma4", _gemma4_config, LazyClass("Gemma4ForConditionalGeneration"), _gemma4_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("gemma4_unified", _gemma4_unified_config, LazyClass("Gemma4UnifiedForConditionalGeneration"),
              _gemma4_unified_inputs, full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("chameleon", _chameleon_config, LazyClass("ChameleonForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 16, 16)), full_attention=2),
    TinyModel("emu3", _emu3_config, LazyClass("Emu3ForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 16, 12),
                            image_sizes=lambda b: torch.tensor([[16, 12]] * b)), full_attention=2),
    TinyModel("fuyu", _fuyu_config, LazyClass("FuyuForCausalLM"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 16, 3 * 4 * 4)), full_attention=2),
    TinyModel("blip-2", _blip_2_config, LazyClass("Blip2ForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 16, 16)), full_attention=2),
    TinyModel("blip", _blip_config,
              LazyClass("BlipForConditionalGeneration", eager=("", "text_config", "vision_config")),
              _text_inputs(pixel_values=lambda b: _pixels(b, 3, 16, 16)), full_attention=2, has_image=False),
    TinyModel("git", _git_config, LazyClass("GitForCausalLM", eager=("", "vision_config")),
              _text_inputs(pixel_values=lambda b: _pixels(b, 3, 16, 16)), full_attention=2, has_image=False),
    TinyModel("florence2", _florence2_config, LazyClass("Florence2ForConditionalGeneration"),
              _image_inputs(17, pixel_values=lambda b: _pixels(b, 3, 32, 32)), full_attention=2,
              skipped=("encoder_attn",)),
    TinyModel("apertus1p5", _apertus1p5_config,
              LazyClass("Apertus1p5ForConditionalGeneration", eager=("vision_config", "audio_config")),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 16, 16),
                            image_sizes=lambda b: torch.tensor([[16, 16]] * b)), full_attention=2),
    TinyModel("cohere_compass", _cohere_compass_config, LazyClass("CohereCompassForConditionalGeneration"),
              _qwen_inputs, full_attention=2),
    TinyModel("cosmos3_edge", _cosmos3_edge_config, LazyClass("Cosmos3EdgeForConditionalGeneration"),
              _packed_qwen_inputs(3 * 4 * 4), full_attention=2),
    TinyModel("cosmos3_omni", _cosmos3_omni_config, LazyClass("Cosmos3OmniForConditionalGeneration"),
              _qwen_inputs, full_attention=2),
    TinyModel("deepseek_ocr2", _deepseek_ocr2_config, LazyClass("DeepseekOcr2ForConditionalGeneration"),
              _image_inputs(145, pixel_values=lambda b: _pixels(b, 3, 32, 32)), full_attention=2),
    TinyModel("exaone4_5", _exaone4_5_config, LazyClass("Exaone4_5_ForConditionalGeneration"),
              _without(_qwen_inputs, "mm_token_type_ids"),
              full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("dots3_note", _dots3_note_config, LazyClass("Dots3NoteForConditionalGeneration"),
              _without(_packed_qwen_inputs(3 * 4 * 4), "mm_token_type_ids"), full_attention=2),
    TinyModel("ernie4_5_vl_moe", _ernie4_5_vl_moe_config, LazyClass("Ernie4_5_VLMoeForConditionalGeneration"),
              _packed_qwen_inputs(3 * 4 * 4), full_attention=2),
    TinyModel("glm5_next", _glm5_next_config, LazyClass("Glm5NextForConditionalGeneration"), _qwen_inputs,
              full_attention=1),
    TinyModel("granite4_vision", _granite4_vision_config, LazyClass("Granite4VisionForConditionalGeneration"),
              _granite4_vision_inputs, full_attention=2),
    TinyModel("evolla", _evolla_config, LazyClass("EvollaForProteinText2Text"), _evolla_inputs, full_attention=2,
              has_image=False),
    TinyModel("aria", _aria_config, LazyClass("AriaForConditionalGeneration"),
              _image_inputs(16, pixel_values=lambda b: _pixels(b, 3, 32, 32),
                            pixel_mask=lambda b: torch.ones(b, 32, 32, dtype=torch.bool)), full_attention=2),
]
NOT_BUILDABLE: dict[str, str] = {
    "gemma3n": "its vision tower is a timm MobileNetV5 (TimmWrapperModel): timm is not a dependency",
    "fun_asr_nano": "audio-only: no image input",
    "glmasr": "audio-only: no image input",
    "diffusion_gemma": "block-diffusion generate() (canvases denoised against a prompt cache): no greedy "
                       "token-by-token decode to compare",
}

_INNER_GENERATE = ("generate() merges the image itself and calls the inner language model's generate(): "
                   "model.compile() never sees the decoder, nothing is compressed; one WARNING says so "
                   "(tests/test_generate_check.py)")

_MLA = ("multi-head latent attention: the cache keeps the latent (k_pass [B, 1, S, kv_lora_rank]) and the "
        "shared RoPE Key; Keys are up-projected after the cache read, so the layer is left exact, reported as "
        "writing a KV cache that no attention the pass recognises reads, with a WARNING")

_GRANITE4 = ("every image feature is injected inside the decoder loop (masked_scatter on the hidden states at "
             "layers 0 and 1): Dynamo breaks the prefill graph per layer (sites named 'self_attn'), no merge is "
             "found and the span is empty, so the layers stay exact by the byte rule (Key bytes 1.00x)")
_EVOLLA = ("the protein cross-attention adapter breaks every decoder layer into several frames; at decode a "
           "graph receives a compressed Key cache whose attention it does not hold, and generate() raises "
           "RotateKCacheError ('1 compressed Key caches reach code that was not rewritten'): loudly refused")

SLOW: dict[str, str] = {
    "glm5_next": "each compiled generation took ~150 s on the 2-core machine (reference linear-attention "
                 "kernels, hyper-connections, indexer), against ~20 s for the other classes",
}

_SPLIT_NAMES = ("each decoder layer is a graph of its own (DeepStack's boolean-index add after layer 0 has a "
                 "data-dependent shape): sites are named relative to the layer ('self_attn'); the span reaches "
                 "every layer (carried across the graphs in between), and the compression is right")

KNOWN_GAPS: dict[str, dict[str, str]] = {
    "sites": {
        "evolla": _EVOLLA,
        "granite4_vision": _GRANITE4,
        "dots3_note": _MLA,
        "glm5_next": _MLA,
        "blip": _INNER_GENERATE,
        "blip-2": _INNER_GENERATE,
        "git": ("its eager attention scales by division (scores / sqrt(d)), which the eager matcher does not "
                "recognise: left exact, but reported as 'intermediates reused elsewhere'"),
        "cohere_compass": _SPLIT_NAMES,
        "cosmos3_omni": _SPLIT_NAMES,
    },
    "exact": {
        "evolla": _EVOLLA,
    },
    "span": {
        "evolla": _EVOLLA,
        "granite4_vision": _GRANITE4,
        "dots3_note": _MLA,
        "glm5_next": _MLA,
        "blip": _INNER_GENERATE,
        "blip-2": _INNER_GENERATE,
        "git": "no layer is rewritten (see sites); the image is concatenated in front of the text, not merged",
        "florence2": ("encoder-decoder: the image sits in the encoder (cross-attention cache, never compressed); "
                      "the decoder self-attention span is empty, so its layers stay exact by the byte rule (Key "
                      "bytes 1.00x); one WARNING says so"),
    },
}
