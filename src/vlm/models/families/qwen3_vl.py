"""Qwen3-VL (dense): a native-resolution ViT whose patch merger, and the DeepStack mergers of three of
its layers, feed a Qwen3 language model (q/k RMSNorm) with interleaved multimodal RoPE."""

from __future__ import annotations

from typing import Any

import transformers

from vlm.quant.policies import ModelParts

from .base import image_only, image_processor
from .qwen2_vl import CHATML_GENERATION_PROMPT, CHATML_TURN, Qwen2VL

# ChatML turns as in Qwen3-VL's own template: no default system turn (Qwen2-VL's adds one); an
# image is <|vision_start|><|image_pad|><|vision_end|>, <|image_pad|> repeated per merged patch.
QWEN3_VL_CHAT_TEMPLATE = "{% for message in messages %}" + CHATML_TURN + "{% endfor %}" + CHATML_GENERATION_PROMPT

# Qwen3-VL's processor insists on a video processor (torchvision); images need only these two.
Qwen3VLProcessor = image_only(transformers.Qwen3VLProcessor, __name__)


class Qwen3VL(Qwen2VL):
    """Laid out as Qwen2-VL, with the same special tokens and image processor, at 16-pixel patches."""

    model_type = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    processor_class_name = "Qwen3VLProcessor"
    image_only_processor = Qwen3VLProcessor
    # DeepStack: the features of some ViT layers reach the first decoder layers through mergers of
    # their own, which bridge vision and language as the final merger does.
    deepstack_projectors = "model.visual.deepstack_merger_list"
    tiny_chat_template = QWEN3_VL_CHAT_TEMPLATE

    patch_size = 16

    @property
    def parts(self) -> ModelParts:
        return ModelParts(vision=(self.vision_tower,), projector=(self.projector, self.deepstack_projectors))

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        size = self.tiny
        head_dim = size.hidden_size // size.num_heads
        return transformers.Qwen3VLConfig(
            vision_config={
                "depth": size.vision_layers,
                "hidden_size": size.vision_hidden_size,
                "intermediate_size": 2 * size.vision_hidden_size,
                "num_heads": size.vision_heads,
                "out_hidden_size": size.hidden_size,
                "patch_size": self.patch_size,
                "spatial_merge_size": self.merge_size,
                "temporal_patch_size": 2,
                # A 4x4 grid of learned position embeddings, interpolated to each image's grid.
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
            text_config=self.tiny_text_config(
                token_ids,
                vocab_size,
                head_dim=head_dim,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 5_000_000.0,
                    # Three interleaved streams over half the rotary dimension, as [24, 20, 20] of 64.
                    "mrope_section": mrope_sections(head_dim),
                    "mrope_interleaved": True,
                },
            ),
            **self.vision_token_ids(token_ids),
        )

    # ---- the full-size architecture (vlm-bench, scripts/bench_step.py) --------------------------
    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 151936) -> transformers.PretrainedConfig:
        """Qwen3-VL-8B-Instruct's architecture, its special tokens at ``token_ids``."""
        return transformers.Qwen3VLConfig(
            vision_config={
                "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
            },
            text_config={
                "vocab_size": vocab_size, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                    "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                "eos_token_id": token_ids[self.tiny_eos], "pad_token_id": token_ids[self.tiny_pad],
            },
            tie_word_embeddings=False,
            **self.vision_token_ids(token_ids),
        )

    def full_size_processor(self, tokenizer: Any) -> Any:
        """The checkpoint's image settings: 16 px patches merged 2x2, up to 16384 patches an image."""
        return self.image_only_processor(
            image_processor=image_processor(
                "Qwen2VL", min_pixels=64 * 32 * 32, max_pixels=16384 * 32 * 32,
                patch_size=16, merge_size=2, temporal_patch_size=2,
            ),
            tokenizer=tokenizer,
            chat_template=self.tiny_chat_template,
        )


def mrope_sections(head_dim: int) -> list[int]:
    """Temporal, height and width shares of ``head_dim // 2`` rotary frequencies, in Qwen3-VL's
    proportions (24, 20, 20 of 64); interleaving needs height and width to fit ``3 * share``."""
    half = head_dim // 2
    spatial = (half * 20) // 64
    return [half - 2 * spatial, spatial, spatial]
