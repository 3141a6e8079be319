"""Tiny random-init models of the VLM classes of part c (``nemo_speechlm`` … ``voxtral_realtime``).

Same conventions as ``tests/tiny_models.py``: 2 decoder layers, hidden 64, 4 query heads, 2 KV
heads, head_dim 16, vocabulary 256, fp32, vision towers of 1–2 layers, images of 16 tokens (13 and
21 where the layout fixes the count), fixed seeds. Config modules missing from an older
transformers are imported inside ``make_config`` and model classes named through ``LazyClass``,
so that the harness skips them there.

:data:`MODELS` lists what is built; :data:`NOT_BUILDABLE` says why the other model types of the
part are not; :data:`KNOWN_GAPS` (check → model type → cause) are product gaps, expected to fail.
"""

from __future__ import annotations

import types

import torch
import transformers as tf

from tests.tiny_models import (
    _BOI, _EOI, BOS, DECODER, EOS, IMAGE, PAD, ROWS, VISION, TinyModel, _clip, _gemma3_inputs, _image_rows,
    _left_pad, _pixels, _qwen_inputs, _siglip, _text)
from tests.vlm_classes.checks import NEW_TOKENS
from tests.vlm_classes.common import LazyClass

_VIDEO = 247


def _llama(**extra):
    return tf.LlamaConfig(num_hidden_layers=2, **DECODER, **extra)


# ---------------------------------------------------------------------------------------------
# VipLLaVA: CLIP 16×16, patch 4 → 16 patch tokens; features from two vision layers


def _vipllava_config():
    return tf.VipLlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE,
                             image_seq_length=16, vision_feature_layer=[-2, -1])


def _llava_like_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 16, 16))


def _llava_like_32(model, batch):  # the same prompt with a 32×32 image
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 32, 32))


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


def _shieldgemma2_config():
    from transformers.models.shieldgemma2.configuration_shieldgemma2 import ShieldGemma2Config

    text = tf.Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                               sliding_window=8, query_pre_attn_scalar=16, **DECODER)
    return ShieldGemma2Config(text_config=text, vision_config=_siglip(32, 8), mm_tokens_per_image=16,
                              boi_token_index=_BOI, eoi_token_index=_EOI, image_token_index=IMAGE)


# ---------------------------------------------------------------------------------------------
# Qwen3-VL (+ MoE): 32×32 image, patch 4 → 8×8 patches, merge 2×2 → 16 tokens (the prompts of
# tests/tiny_models.py's Qwen2-VL); M-RoPE (interleaved); DeepStack adds vision-layer-0 features to
# the image tokens after decoder layer 0


_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
_QWEN_TOKENS = dict(image_token_id=IMAGE, video_token_id=_VIDEO, vision_start_token_id=248,
                    vision_end_token_id=249)


def _qwen3_vision(config_class, **extra):
    return config_class(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                        **extra)


def _qwen3_vl_config():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import (
        Qwen3VLConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig)

    text = Qwen3VLTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE), **DECODER)
    return Qwen3VLConfig(vision_config=_qwen3_vision(Qwen3VLVisionConfig, deepstack_visual_indexes=[0]),
                         text_config=text, **_QWEN_TOKENS)


def _qwen3_vl_moe_config():
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import (
        Qwen3VLMoeConfig, Qwen3VLMoeTextConfig, Qwen3VLMoeVisionConfig)

    text = Qwen3VLMoeTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE), num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, **DECODER)
    return Qwen3VLMoeConfig(vision_config=_qwen3_vision(Qwen3VLMoeVisionConfig, deepstack_visual_indexes=[0]),
                            text_config=text, **_QWEN_TOKENS)


# ---------------------------------------------------------------------------------------------
# Qwen3.5 (+ MoE): layer 0 Gated DeltaNet linear attention (no KV cache to compress), layer 1 full
# attention with an output gate and partial RoPE (half of head_dim); Qwen3-VL's vision tower
# without DeepStack


_LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
               linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
_MROPE_HALF = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
               "partial_rotary_factor": 0.5}


def _qwen3_5_config():
    from transformers.models.qwen3_5.configuration_qwen3_5 import (
        Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig)

    text = Qwen3_5TextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE_HALF), **_LINEAR, **DECODER)
    return Qwen3_5Config(vision_config=_qwen3_vision(Qwen3_5VisionConfig), text_config=text, **_QWEN_TOKENS)


def _qwen3_5_moe_config():
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import (
        Qwen3_5MoeConfig, Qwen3_5MoeTextConfig, Qwen3_5MoeVisionConfig)

    text = Qwen3_5MoeTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE_HALF), num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                **_LINEAR, **{k: v for k, v in DECODER.items() if k != "intermediate_size"})
    return Qwen3_5MoeConfig(vision_config=_qwen3_vision(Qwen3_5MoeVisionConfig), text_config=text, **_QWEN_TOKENS)


# ---------------------------------------------------------------------------------------------
# Qwen4-Exp: Qwen3.5's layout (layer 0 Gated DeltaNet, layer 1 softmax attention) with MoE,
# 2 hyper-connection streams, and the full-attention layer masked by its QSA token indexer
# (blocks of 4 Keys, a budget of 8 tokens per query: its "indexed_attention")


def _qwen4_exp_config():
    from transformers.models.qwen4_exp.configuration_qwen4_exp import (
        Qwen4ExpConfig, Qwen4ExpTextConfig, Qwen4ExpVisionConfig)

    text = Qwen4ExpTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE_HALF), num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                              hc_count=2, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                              indexer_budget=8, indexer_compress_ratio=4, **_LINEAR,
                              **{k: v for k, v in DECODER.items() if k != "intermediate_size"})
    return Qwen4ExpConfig(vision_config=_qwen3_vision(Qwen4ExpVisionConfig), text_config=text, **_QWEN_TOKENS)


# ---------------------------------------------------------------------------------------------
# Qwen2.5-Omni thinker: Qwen2.5-VL's vision tower and prompts (plus an audio tower, unused here)


_MROPE_PLAIN = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen2_5_omni_thinker_config():
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniTextConfig, Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniVisionEncoderConfig)

    vision = Qwen2_5OmniVisionEncoderConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                            out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                            temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    audio = Qwen2_5OmniAudioEncoderConfig(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2,
                                          encoder_ffn_dim=64, d_model=32, output_dim=64)
    text = Qwen2_5OmniTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE_PLAIN),
                                 **{k: v for k, v in DECODER.items() if k != "head_dim"})
    return Qwen2_5OmniThinkerConfig(vision_config=vision, audio_config=audio, text_config=text,
                                    image_token_index=IMAGE, video_token_index=_VIDEO, audio_token_index=244,
                                    audio_start_token_id=242, audio_end_token_id=243, vision_start_token_id=248,
                                    vision_end_token_id=249)


def _qwen_inputs_no_types(model, batch):
    inputs = _qwen_inputs(model, batch)
    del inputs["mm_token_type_ids"]  # M-RoPE positions come from the vision-start tokens
    return inputs


# ---------------------------------------------------------------------------------------------
# Qwen3-Omni-MoE thinker: Qwen3-VL's vision tower (DeepStack) and prompts, MoE decoder, audio tower
# unused


def _qwen3_omni_moe_thinker_config():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoderConfig, Qwen3OmniMoeTextConfig, Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeVisionEncoderConfig)

    audio = Qwen3OmniMoeAudioEncoderConfig(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2,
                                           encoder_ffn_dim=64, d_model=32, output_dim=64, downsample_hidden_size=16)
    text = Qwen3OmniMoeTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE), num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                  **{k: v for k, v in DECODER.items() if k != "head_dim"})
    vision = _qwen3_vision(Qwen3OmniMoeVisionEncoderConfig, deepstack_visual_indexes=[0])
    return Qwen3OmniMoeThinkerConfig(vision_config=vision, audio_config=audio, text_config=text,
                                     image_token_id=IMAGE, video_token_id=_VIDEO, audio_token_id=244,
                                     audio_start_token_id=242, vision_start_token_id=248)


# ---------------------------------------------------------------------------------------------
# Qwen2.5-Omni / Qwen3-Omni-MoE, the whole model with audio output off: ``generate()`` is their own,
# and calls ``self.thinker.generate()`` (the thinker's own ``max_new_tokens`` is
# ``thinker_max_new_tokens``); Qwen2.5-Omni checks the speaker even for text output and wants
# ``generation_mode="text"`` without a talker


def _qwen2_5_omni_config():
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig(thinker_config=_qwen2_5_omni_thinker_config(), enable_audio_output=False)


def _qwen3_omni_moe_config():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    return Qwen3OmniMoeConfig(thinker_config=_qwen3_omni_moe_thinker_config(), enable_audio_output=False)


def _omni_prepare(model):
    if hasattr(model, "speaker_map"):  # Qwen2.5-Omni
        model.speaker_map = {"Chelsie": {}}  # the default speaker's entry (a hub file in real checkpoints)
        # its generate() reads the talker's pad token even for text output, without a talker
        model.talker = types.SimpleNamespace(codec_pad_token=PAD)
    model.thinker.generation_config.eos_token_id = None
    model.thinker.generation_config.pad_token_id = PAD


def _omni_inputs(model, batch):
    return dict(_qwen_inputs_no_types(model, batch), thinker_max_new_tokens=NEW_TOKENS, generation_mode="text")


# ---------------------------------------------------------------------------------------------
# Ovis2: 16×16 image, patch 4 → 16 visual-vocabulary tokens (a visual vocabulary of 64); the image
# sits between two visual indicator tokens, whose embeddings the model writes by boolean index


_INDICATORS = [240, 241, 242, 243, 244]


def _ovis2_config():
    from transformers.models.ovis2.configuration_ovis2 import Ovis2Config, Ovis2VisionConfig

    vision = Ovis2VisionConfig(image_size=16, patch_size=4, vocab_size=64, hidden_stride=1,
                               num_visual_indicator_tokens=len(_INDICATORS), **VISION)
    return Ovis2Config(vision_config=vision, text_config=tf.Qwen2Config(num_hidden_layers=2, **DECODER),
                       image_token_id=IMAGE, visual_indicator_token_ids=_INDICATORS, vocab_size=DECODER["vocab_size"],
                       hidden_size=DECODER["hidden_size"])


def _ovis2_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16, [_INDICATORS[0]], [_INDICATORS[1]])
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# PaddleOCR-VL: 32×32 image as 8×8 patches of 4×4 (a flat patch list), merge 2×2 → 16 tokens;
# ERNIE-4.5 decoder with M-RoPE; Qwen-style vision start/end tokens


def _paddleocr_vl_config():
    from transformers.models.paddleocr_vl.configuration_paddleocr_vl import (
        PaddleOCRTextConfig, PaddleOCRVisionConfig, PaddleOCRVLConfig)

    vision = PaddleOCRVisionConfig(image_size=32, patch_size=4, spatial_merge_size=2, **VISION)
    text = PaddleOCRTextConfig(num_hidden_layers=2, rope_parameters=dict(_MROPE_PLAIN), **DECODER)
    return PaddleOCRVLConfig(vision_config=vision, text_config=text, **_QWEN_TOKENS)


def _paddleocr_vl_inputs(model, batch):
    inputs = _qwen_inputs(model, batch)
    inputs["pixel_values"] = _pixels(batch * 64, 3, 4, 4)  # [patches, C, p, p]
    return inputs


# ---------------------------------------------------------------------------------------------
# VideoLLaMA3: 32×32 image as 8×8 flat patches of 4×4, merge size 2 → 16 tokens; Qwen2 decoder


def _video_llama_3_config():
    from transformers.models.video_llama_3.configuration_video_llama_3 import (
        VideoLlama3Config, VideoLlama3VisionConfig)

    vision = VideoLlama3VisionConfig(patch_size=4, **VISION)
    return VideoLlama3Config(vision_config=vision, text_config=tf.Qwen2Config(num_hidden_layers=2, **DECODER),
                             image_token_id=IMAGE, video_token_id=_VIDEO)


def _video_llama_3_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch * 64, 3 * 4 * 4),
                image_grid_thw=torch.tensor([[1, 8, 8]] * batch), image_merge_sizes=torch.tensor([2] * batch))


# ---------------------------------------------------------------------------------------------
# Qianfan-OCR (InternVL layout): 32×32 image, patch 4 → 64 patches (CLS dropped), pixel shuffle
# 0.5 → 16 tokens; Qwen3 decoder (QK-norm)


def _qianfan_ocr_config():
    from transformers.models.qianfan_ocr.configuration_qianfan_ocr import QianfanOCRConfig, QianfanOCRVisionConfig

    vision = QianfanOCRVisionConfig(image_size=32, patch_size=4, drop_path_rate=0.0, **VISION)
    return QianfanOCRConfig(vision_config=vision, text_config=tf.Qwen3Config(num_hidden_layers=2, **DECODER),
                            image_token_id=IMAGE, image_seq_length=16)


# ---------------------------------------------------------------------------------------------
# Step3.7: 64×64 image, patch 4 → 16×16 patches, the projector's stride-2 convolutions → 4×4 = 16
# tokens; MoE decoder with gated heads, layer 0 sliding (window 8), layer 1 full


def _step3p7_config():
    from transformers.models.step3p7.configuration_step3p7 import (
        Step3p7Config, Step3p7TextConfig, Step3p7VisionConfig)

    vision = Step3p7VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                 patch_size=4, max_position_embeddings=256)
    text = Step3p7TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                             mlp_layer_types=["dense", "sparse"], n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, share_expert_dim=32, **DECODER)
    return Step3p7Config(vision_config=vision, text_config=text, image_token_id=IMAGE)


def _step3p7_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# Phi-4-multimodal: SigLIP-like 16×16 crops, patch 4 → 4×4, 2×2 average pool → 2×2 per crop; one
# global view + one sub-crop, each row of 2 followed by a separator: 2·3 + 1 + 2·3 = 13 image tokens,
# written into the embeddings by index_put on nonzero() positions. The vision tower gets eager
# attention: its attention module says is_causal=True, which SDPA honours uncompiled (the all-ones
# patch mask becomes None) but not under torch.compile, so SDPA runs would differ before any rewrite


_PHI4_IMAGE_TOKENS = 13


def _phi4_multimodal_config():
    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import (
        Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalVisionConfig)

    vision = Phi4MultimodalVisionConfig(image_size=16, crop_size=16, patch_size=4, image_token_id=IMAGE, **VISION)
    audio = Phi4MultimodalAudioConfig(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2,
                                      ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                                      input_size=16, audio_token_id=244)
    decoder = {k: v for k, v in DECODER.items() if k != "head_dim"}
    return Phi4MultimodalConfig(num_hidden_layers=2, vision_config=vision, audio_config=audio, **decoder)


def _phi4_multimodal_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * _PHI4_IMAGE_TOKENS)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, image_pixel_values=_pixels(batch, 2, 3, 16, 16),
                image_sizes=torch.tensor([[16, 16]] * batch),
                image_attention_mask=torch.ones(batch, 2, 4, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Unlimited-OCR (DeepSeek-OCR layout): SAM 64×64, patch 4 → 16×16, two stride-2 convolutions → 4×4
# fed to a CLIP encoder; 4 rows of 4 + a newline each, + a view separator = 21 image tokens.
# MoE decoder: layer 0 "reference sliding" (the prompt kept whole, a window of 8 after it), layer 1 full


_UNLIMITED_OCR_IMAGE_TOKENS = 21


def _unlimited_ocr_config():
    from transformers.models.unlimited_ocr.configuration_unlimited_ocr import (
        UnlimitedOcrConfig, UnlimitedOcrSamVisionConfig, UnlimitedOcrTextConfig, UnlimitedOcrVisionConfig,
        UnlimitedOcrVisionEncoderConfig)

    sam = UnlimitedOcrSamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                                      downsample_channels=[32, 64])
    encoder = UnlimitedOcrVisionEncoderConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=16, patch_size=4)
    text = UnlimitedOcrTextConfig(num_hidden_layers=2, layer_types=["reference_sliding_attention", "full_attention"],
                                  sliding_window=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, **{k: v for k, v in DECODER.items() if k != "head_dim"})
    return UnlimitedOcrConfig(vision_config=UnlimitedOcrVisionConfig(sam_config=sam, encoder_config=encoder),
                              text_config=text, image_token_id=IMAGE)


def _unlimited_ocr_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * _UNLIMITED_OCR_IMAGE_TOKENS)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# Nemotron-H Omni: RADIO tower on 8×8 flat patches of 4×4, pixel shuffle 0.5 → 16 tokens; Nemotron-H
# decoder of one Mamba-2 block (layer 0) and one attention block (layer 1)


def _nemotron_h_omni_config():
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config)

    vision = dict(model_type="radio", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                  image_size=32, max_img_size=64, num_cls_tokens=1, num_registers=0, video_temporal_patch_size=2)
    text = dict(model_type="nemotron_h", num_hidden_layers=2, layers_block_type=["mamba", "attention"],
                ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, chunk_size=16, **DECODER)
    return NemotronH_Omni_Reasoning_V3_Config(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                              video_token_id=_VIDEO, projector_hidden_size=64,
                                              vision_hidden_size=32)


def _nemotron_h_omni_inputs(model, batch):
    rows, _ = _image_rows(batch, [IMAGE] * 16)
    ids, mask = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch * 64, 3 * 4 * 4),
                image_grid_hw=torch.tensor([[8, 8]] * batch))


# ---------------------------------------------------------------------------------------------
# PP-Chart2Table: GOT-OCR2 under its own config (the mapping builds GotOcr2ForConditionalGeneration):
# SAM-style tower 64×64, patch 4 → 16×16, two stride-2 convolutions → 4×4 = 16 tokens; Qwen2 decoder.
# The SAM tower has no SDPA implementation: eager, as from_pretrained would pick


def _pp_chart2table_config():
    from transformers.models.pp_chart2table.configuration_pp_chart2table import (
        PPChart2TableConfig, PPChart2TableVisionConfig)

    vision = PPChart2TableVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=64, patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64)
    return PPChart2TableConfig(vision_config=vision, image_token_index=IMAGE, image_seq_length=16,
                               text_config=dict(model_type="qwen2", num_hidden_layers=2, **DECODER))


# ---------------------------------------------------------------------------------------------
# T5Gemma 2: encoder-decoder. The encoder is Gemma 3 (SigLIP 32×32, patch 8 → 16 tokens merged into
# its input, the tiny_models Gemma 3 prompt); the decoder (layer 0 sliding, layer 1 full) attends
# over its own cache and the encoder output in one softmax ("merged attention"). The image reaches
# the decoder only through the cross-attention Keys.


def _t5gemma2_config():
    from transformers.models.t5gemma2.configuration_t5gemma2 import (
        T5Gemma2Config, T5Gemma2DecoderConfig, T5Gemma2EncoderConfig, T5Gemma2TextConfig)

    layers = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                  query_pre_attn_scalar=16, **DECODER)
    encoder = T5Gemma2EncoderConfig(text_config=T5Gemma2TextConfig(**layers), vision_config=_siglip(32, 8),
                                    mm_tokens_per_image=16, boi_token_index=_BOI, eoi_token_index=_EOI,
                                    image_token_index=IMAGE)
    return T5Gemma2Config(encoder=encoder, decoder=T5Gemma2DecoderConfig(**layers), image_token_index=IMAGE)


def _t5gemma2_inputs(model, batch):
    inputs = _gemma3_inputs(model, batch)
    del inputs["token_type_ids"]
    return inputs


# ---------------------------------------------------------------------------------------------
# Pix2Struct: encoder-decoder; the encoder reads 16 flattened 4×4 patches (row, column, 48 pixels),
# the T5-style decoder (relative position bias, no softmax scale, 4 heads of 16) starts from token 0.
# The image is the encoder's whole input: the decoder's self-attention cache holds generated tokens


def _pix2struct_config():
    text = tf.Pix2StructTextConfig(vocab_size=DECODER["vocab_size"], hidden_size=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4, dropout_rate=0.0, use_cache=True, pad_token_id=PAD, eos_token_id=EOS,
                                   decoder_start_token_id=PAD)
    vision = tf.Pix2StructVisionConfig(hidden_size=64, patch_embed_hidden_size=3 * 4 * 4, d_ff=64, d_kv=16,
                                       num_hidden_layers=2, num_attention_heads=4, seq_len=16)  # hidden = the decoder's
    return tf.Pix2StructConfig(text_config=text, vision_config=vision)


def _pix2struct_inputs(model, batch):
    rows, columns = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
    positions = torch.stack([rows.flatten(), columns.flatten()], -1).float()  # [16, 2]
    patches = torch.cat([positions.expand(batch, -1, -1), _pixels(batch, 16, 3 * 4 * 4)], -1)  # [B, 16, 50]
    return dict(flattened_patches=patches, attention_mask=torch.ones(batch, 16, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Vision-encoder-decoder: ViT 16×16, patch 4 (16 patches + CLS) → GPT-2 decoder with cross-attention
# (2 layers, 4 heads of 16), started from BOS. The image is the encoder's whole input


def _vision_encoder_decoder_config():
    encoder = tf.ViTConfig(image_size=16, patch_size=4, **VISION)
    decoder = tf.GPT2Config(vocab_size=DECODER["vocab_size"], n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            add_cross_attention=True, is_decoder=True, bos_token_id=BOS, eos_token_id=EOS,
                            pad_token_id=PAD)
    config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = BOS, PAD
    return config


def _pixels_only(model, batch):
    return dict(pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------
# PP-FormulaNet: encoder-decoder; SAM-style encoder 64×64, patch 4 → 16×16, two stride-2 convolutions
# → 16 tokens for the cross-attention of an MBart-style decoder (2 layers, 4 heads of 16)


def _pp_formulanet_config():
    from transformers.models.pp_formulanet.configuration_pp_formulanet import (
        PPFormulaNetConfig, PPFormulaNetTextConfig, PPFormulaNetVisionConfig)

    vision = PPFormulaNetVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                                      post_conv_in_channels=16, post_conv_mid_channels=32, post_conv_out_channels=64,
                                      decoder_hidden_size=64)
    text = PPFormulaNetTextConfig(vocab_size=DECODER["vocab_size"], max_position_embeddings=512, decoder_layers=2,
                                  decoder_ffn_dim=128, decoder_attention_heads=4, d_model=64, dropout=0.0)
    return PPFormulaNetConfig(text_config=text, vision_config=vision)


def _pixels_64(model, batch):
    return dict(pixel_values=_pixels(batch, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# UDOP: T5-style encoder-decoder (relative position bias, no softmax scale, 4 heads of 16). The
# encoder fuses the text tokens, their boxes and 16×16 / 4 = 16 image patches; the decoder starts from
# token 0


def _udop_config():
    return tf.UdopConfig(vocab_size=DECODER["vocab_size"], d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         dropout_rate=0.0, image_size=16, patch_size=4, pad_token_id=PAD, eos_token_id=EOS,
                         decoder_start_token_id=PAD)


def _udop_inputs(model, batch):
    rows = [[BOS] + _text(row.pre + row.post) for row in ROWS[batch]]
    ids, mask = _left_pad(rows)
    corners = torch.rand(*ids.shape, 2) * 0.5
    boxes = torch.cat([corners, corners + 0.25], -1)  # [B, S, 4]: x0, y0, x1, y1 in [0, 1]
    return dict(input_ids=ids, attention_mask=mask, bbox=boxes, pixel_values=_pixels(batch, 3, 16, 16))


# ---------------------------------------------------------------------------------------------


MODELS: list[TinyModel] = [
    TinyModel("vipllava", _vipllava_config, LazyClass("VipLlavaForConditionalGeneration"), _llava_like_inputs,
              full_attention=2),
    TinyModel("video_llava", _video_llava_config, LazyClass("VideoLlavaForConditionalGeneration"), _video_llava_inputs,
              full_attention=2),
    TinyModel("perception_lm", _perception_lm_config, LazyClass("PerceptionLMForConditionalGeneration"),
              _perception_lm_inputs, full_attention=2),
    TinyModel("shieldgemma2", _shieldgemma2_config, LazyClass("Gemma3ForConditionalGeneration"), _gemma3_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("qwen3_vl", _qwen3_vl_config, LazyClass("Qwen3VLForConditionalGeneration"), _qwen_inputs,
              full_attention=2),
    TinyModel("qwen3_vl_moe", _qwen3_vl_moe_config, LazyClass("Qwen3VLMoeForConditionalGeneration"),
              _qwen_inputs, full_attention=2),
    TinyModel("qwen3_5", _qwen3_5_config, LazyClass("Qwen3_5ForConditionalGeneration"), _qwen_inputs,
              full_attention=1, skipped=("layers.0.linear_attn",)),
    TinyModel("qwen3_5_moe", _qwen3_5_moe_config, LazyClass("Qwen3_5MoeForConditionalGeneration"), _qwen_inputs,
              full_attention=1, skipped=("layers.0.linear_attn",)),
    TinyModel("qwen2_5_omni_thinker", _qwen2_5_omni_thinker_config,
              LazyClass("Qwen2_5OmniThinkerForConditionalGeneration"), _qwen_inputs_no_types, full_attention=2),
    TinyModel("qwen3_omni_moe_thinker", _qwen3_omni_moe_thinker_config,
              LazyClass("Qwen3OmniMoeThinkerForConditionalGeneration"), _qwen_inputs_no_types, full_attention=2),
    TinyModel("qwen2_5_omni", _qwen2_5_omni_config, LazyClass("Qwen2_5OmniForConditionalGeneration"), _omni_inputs,
              full_attention=2, prepare=_omni_prepare),
    TinyModel("qwen3_omni_moe", _qwen3_omni_moe_config, LazyClass("Qwen3OmniMoeForConditionalGeneration"),
              _omni_inputs, full_attention=2, prepare=_omni_prepare),
    TinyModel("ovis2", _ovis2_config, LazyClass("Ovis2ForConditionalGeneration"), _ovis2_inputs, full_attention=2),
    TinyModel("paddleocr_vl", _paddleocr_vl_config, LazyClass("PaddleOCRVLForConditionalGeneration"),
              _paddleocr_vl_inputs, full_attention=2),
    TinyModel("video_llama_3", _video_llama_3_config, LazyClass("VideoLlama3ForConditionalGeneration"),
              _video_llama_3_inputs, full_attention=2),
    TinyModel("qianfan_ocr", _qianfan_ocr_config, LazyClass("QianfanOCRForConditionalGeneration"), _llava_like_32,
              full_attention=2),
    TinyModel("step3p7", _step3p7_config, LazyClass("Step3p7ForConditionalGeneration"), _step3p7_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("phi4_multimodal", _phi4_multimodal_config,
              LazyClass("Phi4MultimodalForCausalLM", eager=("vision_config",)), _phi4_multimodal_inputs,
              full_attention=2),
    TinyModel("unlimited_ocr", _unlimited_ocr_config, LazyClass("UnlimitedOcrForConditionalGeneration"),
              _unlimited_ocr_inputs, full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("nemotron_h_omni", _nemotron_h_omni_config, LazyClass("NemotronH_Omni_Reasoning_V3"),
              _nemotron_h_omni_inputs, full_attention=1, skipped=("layers.0.mixer",)),
    TinyModel("pp_chart2table", _pp_chart2table_config,
              LazyClass("GotOcr2ForConditionalGeneration", eager=("", "vision_config")), _step3p7_inputs,
              full_attention=2),
    TinyModel("t5gemma2", _t5gemma2_config, LazyClass("T5Gemma2ForConditionalGeneration"), _t5gemma2_inputs,
              full_attention=1, skipped=("layers.0.self_attn",)),
    TinyModel("pix2struct", _pix2struct_config, LazyClass("Pix2StructForConditionalGeneration"), _pix2struct_inputs,
              full_attention=2, skipped=("encoder_decoder_attention",), has_image=False),
    TinyModel("vision-encoder-decoder", _vision_encoder_decoder_config, LazyClass("VisionEncoderDecoderModel"),
              _pixels_only, full_attention=2, skipped=("crossattention",), has_image=False),
    TinyModel("pp_formulanet", _pp_formulanet_config,
              LazyClass("PPFormulaNetForConditionalGeneration", eager=("vision_config",)), _pixels_64,
              full_attention=2, skipped=("encoder_attn",), has_image=False),
    TinyModel("udop", _udop_config, LazyClass("UdopForConditionalGeneration"), _udop_inputs, full_attention=2,
              skipped=("EncDecAttention",), has_image=False),
    TinyModel("qwen4_exp", _qwen4_exp_config, LazyClass("Qwen4ExpForConditionalGeneration"), _qwen_inputs,
              full_attention=1, skipped=("layers.0.linear_attn",)),
]

_AUDIO_ONLY = "audio-only: no image input"

NOT_BUILDABLE: dict[str, str] = {
    "nemo_speechlm": _AUDIO_ONLY,
    "omniasr": _AUDIO_ONLY,
    "qwen2_audio": _AUDIO_ONLY,
    "qwen3_asr": _AUDIO_ONLY,
    "vibevoice_asr": _AUDIO_ONLY,
    "voxtral": _AUDIO_ONLY,
    "voxtral_realtime": _AUDIO_ONLY,
    "pi0": ("a flow-matching action policy: no generate(), sample_actions() denoises an action chunk against "
            "the prefix's KV cache; no greedy token decode to compare"),
}

_INNER_GENERATE = ("generate() is the model's own and calls self.thinker.generate(): model.compile() compiles "
                   "the outer forward, which never runs; nothing is compressed, and one WARNING says so "
                   "(tests/test_generate_check.py)")
_MASK_GRAPH_REFUSED = ("the MoE experts' loop (nonzero) breaks every decoder layer into graphs of its own (the prefill "
                  "site is named 'self_attn'); at the first decode step a graph that builds the causal mask "
                  "reads only cache.layers[1].keys.numel(), and the backend refuses it: RotateKCacheError "
                  "('1 compressed Key caches reach code that was not rewritten')")

_RSWA = ("reference sliding attention (the prompt kept whole in the cache layer's prefill_keys, a sliding "
         "window after it): its prefill looks like full attention and is compressed, but its decode reads "
         "cat([prefill_keys, window_keys]), which the decode rewrite does not match; the first decode step "
         "raises RotateKCacheError ('compressed Key caches reach code that was not rewritten')")
_INDEX_LIST_MERGE = ("image features are written by index_put on torch.nonzero() positions (index lists, not a "
                     "boolean mask): no span is found and the prompt-head fallback is empty here: with an empty span the "
                     "compressed form would not be smaller, so every layer stays exact (Key bytes 1.00x)")

_MERGED_ATTENTION = ("merged attention: the decoder's self-attention Keys are concatenated with the encoder's "
                     "(cross) Keys before one softmax, which the pass does not rewrite: the full-attention layer is "
                     "left exact with a WARNING ('merged attention ... (not supported)'), the sliding-window one "
                     "as 'the graph does not return its cache append'")

_T5_NAMES = ("(not a product gap) the check's layer pattern expects 'layers.N.'; T5-style decoders name "
             "their layers '{}'")
_ENCODER_IMAGE = ("encoder-decoder: the image is in the encoder (its cross-attention cache is left exact); the "
                  "decoder's self-attention prompt is one start token, so the span is empty and each layer "
                  "stays exact by the byte rule (Key bytes 1.00x); one WARNING says so where the decoder has "
                  "cross-attention layers")
_GPT2_CROSS = ("(the check's naming, not the product) GPT-2's cross-attention (Conv1D projections) is now told "
               "from self-attention and left exact, and the model is exact at r = d; the check's layer pattern "
               "expects 'layers.N.' where GPT-2 names its layers 'transformer.h.N'")
_GPT2_SPAN = ("encoder-decoder: the image is in the encoder (cross-attention, never compressed); the decoder's "
              "prompt is its start token alone, so there is no span to compress (the check finds no attention_mask); "
              "one WARNING says so")

_SPLIT_NAMES = ("each decoder layer is a graph of its own (DeepStack's boolean-index add after layer 0 has a "
                 "data-dependent shape): sites are named relative to the layer ('self_attn'); the span reaches "
                 "every layer (carried across the graphs in between), and the compression is right")

KNOWN_GAPS: dict[str, dict[str, str]] = {
    "sites": {
        "qwen3_vl": _SPLIT_NAMES,
        "qwen3_vl_moe": _SPLIT_NAMES,
        "qwen3_omni_moe_thinker": _SPLIT_NAMES,
        "qwen4_exp": ("the QSA indexer's per-query Python loop (nonzero) breaks every graph: the prefill site is "
                      "named 'attn_output'; decode is refused (see exact)"),
        "qwen2_5_omni": _INNER_GENERATE,
        "qwen3_omni_moe": _INNER_GENERATE,
        "step3p7": _MASK_GRAPH_REFUSED,
        "unlimited_ocr": _RSWA,
        "t5gemma2": _MERGED_ATTENTION,
        "pix2struct": _T5_NAMES.format("decoder.layer.N.self_attention.attention"),
        "udop": _T5_NAMES.format("decoder.block.N.layer.0.SelfAttention"),
        "vision-encoder-decoder": _GPT2_CROSS,
    },
    "exact": {
        "qwen4_exp": ("at the first decode step a graph that builds the causal mask reads only "
                      "cache.layers[1].keys.numel(), and the backend refuses it: RotateKCacheError; past that, the "
                      "decode mask carries the QSA indexer's token selection, which the decode rewrite would drop"),
        "step3p7": _MASK_GRAPH_REFUSED,
        "unlimited_ocr": _RSWA,
    },
    "span": {
        "qwen4_exp": "decode is refused (see exact)",
        "qwen2_5_omni": _INNER_GENERATE,
        "qwen3_omni_moe": _INNER_GENERATE,
        "ovis2": ("the image merge sits in a frame that Dynamo skips (`if mask.any():` before the visual "
                  "indicator tokens' boolean-index writes) and runs eagerly: no graph holds the merge, the span "
                  "falls back to the prompt head (empty here), so every layer stays exact by the byte rule "
                  "(Key bytes 1.00x)"),
        "step3p7": _MASK_GRAPH_REFUSED,
        "unlimited_ocr": _RSWA,
        "phi4_multimodal": _INDEX_LIST_MERGE,
        "t5gemma2": _MERGED_ATTENTION + "; the image is in the encoder, reached only through the cross Keys",
        "pix2struct": _ENCODER_IMAGE,
        "udop": _ENCODER_IMAGE,
        "pp_formulanet": _ENCODER_IMAGE + " (the check finds no prompt to count a span in)",
        "vision-encoder-decoder": _GPT2_SPAN,
    },
}
