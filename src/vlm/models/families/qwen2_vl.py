"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT whose patch merger feeds image tokens into a Qwen2 language model with multimodal RoPE."""

from __future__ import annotations

from typing import Any

import transformers

from .base import LLAMA_STYLE_LINEARS, ModelFamily, image_only, image_processor

# ChatML turns; an image is <|vision_start|><|image_pad|><|vision_end|>, and the processor repeats
# <|image_pad|> once per merged patch.
# One ChatML turn, and the generation prompt after the last.
CHATML_TURN = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
)
CHATML_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + CHATML_TURN
    + "{% endfor %}"
    + CHATML_GENERATION_PROMPT
)


# Image-only processors under the original class names (see `image_only`).
Qwen2VLProcessor = image_only(transformers.Qwen2VLProcessor, __name__)
Qwen2_5_VLProcessor = image_only(transformers.Qwen2_5_VLProcessor, __name__)


class Qwen2VL(ModelFamily):
    model_type = "qwen2_vl"
    # Qwen's video processor needs torchvision; training on images only needs the image processor.
    image_only_processor = Qwen2VLProcessor
    model_class_name = "Qwen2VLForConditionalGeneration"
    processor_class_name = "Qwen2VLProcessor"
    image_token = "<|image_pad|>"
    vision_tower = "model.visual"
    projector = "model.visual.merger"
    lora_targets = rf"model\.language_model\.layers\.\d+\.{LLAMA_STYLE_LINEARS}"
    tiny_eos = "<|im_end|>"
    tiny_pad = "<|endoftext|>"
    tiny_extra_special_tokens = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
    tiny_chat_template = QWEN_CHAT_TEMPLATE

    patch_size = 14
    merge_size = 2

    def tiny_vision_config(self) -> dict[str, Any]:
        size = self.tiny
        return {
            "depth": size.vision_layers,
            "embed_dim": size.vision_hidden_size,
            "hidden_size": size.hidden_size,
            "num_heads": size.vision_heads,
            "mlp_ratio": 2,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size,
            "temporal_patch_size": 2,
        }

    def tiny_text(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        head_dim = self.tiny.hidden_size // self.tiny.num_heads
        # mrope sections split half the rotary dimension into temporal, height and width parts.
        half = head_dim // 2
        sections = [half - 2 * (half // 3), half // 3, half // 3]
        return self.tiny_text_config(
            token_ids, vocab_size, rope_scaling={"type": "mrope", "mrope_section": sections}
        )

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        return transformers.Qwen2VLConfig(
            vision_config=self.tiny_vision_config(),
            text_config=self.tiny_text(token_ids, vocab_size),
            **self.vision_token_ids(token_ids),
        )

    def vision_token_ids(self, token_ids: dict[str, int]) -> dict[str, int]:
        return {
            "image_token_id": token_ids[self.image_token],
            "video_token_id": token_ids["<|video_pad|>"],
            "vision_start_token_id": token_ids["<|vision_start|>"],
            "vision_end_token_id": token_ids["<|vision_end|>"],
        }

    def tiny_processor(self, tokenizer: Any) -> Any:
        unit = self.patch_size * self.merge_size
        side = 2 * unit  # two merge units a side: a 4x4 patch grid, 4 image tokens after merging
        return self.image_only_processor(
            image_processor=image_processor(
                "Qwen2VL",
                min_pixels=unit * unit,
                max_pixels=side * side,
                patch_size=self.patch_size,
                merge_size=self.merge_size,
                temporal_patch_size=2,
            ),
            tokenizer=tokenizer,
            chat_template=self.tiny_chat_template,
        )


    # ---- the full-size architecture (vlm-bench, scripts/bench_step.py) --------------------------
    def full_size_text(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The 7B language model that Qwen2-VL-7B and Qwen2.5-VL-7B share."""
        return {
            "vocab_size": vocab_size, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
            "eos_token_id": token_ids[self.tiny_eos], "pad_token_id": token_ids[self.tiny_pad],
        }

    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 152064) -> transformers.PretrainedConfig:
        """Qwen2-VL-7B-Instruct's architecture, its special tokens at ``token_ids``."""
        return transformers.Qwen2VLConfig(
            vision_config={
                "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            },
            text_config=self.full_size_text(token_ids, vocab_size),
            tie_word_embeddings=False,
            **self.vision_token_ids(token_ids),
        )

    def full_size_processor(self, tokenizer: Any) -> Any:
        """The checkpoint's image settings: 14 px patches merged 2x2, 4 to 16384 merged patches an image."""
        unit = self.patch_size * self.merge_size
        return self.image_only_processor(
            image_processor=image_processor(
                "Qwen2VL", min_pixels=4 * unit * unit, max_pixels=16384 * unit * unit,
                patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=2,
            ),
            tokenizer=tokenizer,
            chat_template=self.tiny_chat_template,
        )


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL: windowed attention and a SwiGLU MLP in the vision tower; otherwise laid out as Qwen2-VL."""

    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    processor_class_name = "Qwen2_5_VLProcessor"
    image_only_processor = Qwen2_5_VLProcessor

    def tiny_vision_config(self) -> dict[str, Any]:
        size = self.tiny
        return {
            "depth": size.vision_layers,
            "hidden_size": size.vision_hidden_size,
            "intermediate_size": 2 * size.vision_hidden_size,
            "out_hidden_size": size.hidden_size,
            "num_heads": size.vision_heads,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size,
            "temporal_patch_size": 2,
            "window_size": 2 * self.patch_size * self.merge_size,
            "fullatt_block_indexes": [size.vision_layers - 1],
        }

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        return transformers.Qwen2_5_VLConfig(
            vision_config=self.tiny_vision_config(),
            text_config=self.tiny_text(token_ids, vocab_size),
            **self.vision_token_ids(token_ids),
        )

    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 152064) -> transformers.PretrainedConfig:
        """Qwen2.5-VL-7B-Instruct's architecture, its special tokens at ``token_ids``."""
        return transformers.Qwen2_5_VLConfig(
            vision_config={
                "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584,
                "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            },
            text_config=self.full_size_text(token_ids, vocab_size),
            tie_word_embeddings=False,
            **self.vision_token_ids(token_ids),
        )

    def tiny_processor(self, tokenizer: Any) -> Any:
        processor = super().tiny_processor(tokenizer)
        return self.image_only_processor(
            image_processor=processor.image_processor, tokenizer=tokenizer, chat_template=self.tiny_chat_template
        )
