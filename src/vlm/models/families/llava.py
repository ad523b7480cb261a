"""LLaVA 1.5 (CLIP ViT + two-layer MLP projector + Llama/Vicuna) and LLaVA-NeXT (adds any-resolution tiling)."""

from __future__ import annotations

from typing import Any

import transformers

from .base import LLAMA_STYLE_LINEARS, ModelFamily, image_processor

# USER/ASSISTANT turns as in LLaVA-1.5; images render as the <image> placeholder that the
# processor expands to one token per patch. Assistant turns end with </s> so the model learns to stop.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ '\\n' }}"
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class Llava(ModelFamily):
    model_type = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    processor_class_name = "LlavaProcessor"
    image_token = "<image>"
    vision_tower = "model.vision_tower"
    projector = "model.multi_modal_projector"
    lora_targets = rf"model\.language_model\.layers\.\d+\.{LLAMA_STYLE_LINEARS}"
    tiny_bos = "<s>"
    tiny_eos = "</s>"
    tiny_pad = "<pad>"
    tiny_extra_special_tokens = ("<unk>",)
    tiny_chat_template = LLAVA_CHAT_TEMPLATE

    patch_size = 8

    def tiny_vision_config(self) -> dict[str, Any]:
        return self.tiny_vit_config(
            self.patch_size, model_type="clip_vision_model", projection_dim=self.tiny.vision_hidden_size
        )

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        return transformers.LlavaConfig(
            vision_config=self.tiny_vision_config(),
            text_config={"model_type": "llama", **self.tiny_text_config(token_ids, vocab_size)},
            image_token_index=token_ids[self.image_token],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=token_ids[self.tiny_pad],
        )

    def tiny_image_processor(self) -> Any:
        side = self.tiny.image_size
        return image_processor(
            "CLIP", size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )

    def tiny_processor(self, tokenizer: Any) -> Any:
        return transformers.LlavaProcessor(
            image_processor=self.tiny_image_processor(),
            tokenizer=tokenizer,
            patch_size=self.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token
            chat_template=self.tiny_chat_template,
        )


    # ---- the full-size architecture (vlm-bench, scripts/bench_step.py) --------------------------
    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 32064) -> transformers.PretrainedConfig:
        """LLaVA-1.5-7B's architecture (CLIP ViT-L/14 at 336 px, Vicuna-7B), its special tokens at ``token_ids``."""
        return transformers.LlavaConfig(
            vision_config={
                "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                "projection_dim": 768,
            },
            text_config={
                "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "bos_token_id": token_ids[self.tiny_bos], "eos_token_id": token_ids[self.tiny_eos],
                "pad_token_id": token_ids[self.tiny_pad],
            },
            image_token_index=token_ids[self.image_token],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=token_ids[self.tiny_pad],
        )

    def full_size_processor(self, tokenizer: Any) -> Any:
        """The checkpoint's image settings: 336 px, 14 px patches, 576 image tokens."""
        return transformers.LlavaProcessor(
            image_processor=image_processor(
                "CLIP", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
            ),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token
            chat_template=self.tiny_chat_template,
        )


class LlavaNext(Llava):
    """LLaVA-NeXT: the image is split into tiles on a grid of pinpoint resolutions, plus a global view."""

    model_type = "llava_next"
    model_class_name = "LlavaNextForConditionalGeneration"
    processor_class_name = "LlavaNextProcessor"
    # LLaVA-1.5's would build the wrong model class; LLaVA-NeXT's full size is not described yet.
    full_size_config = None
    full_size_processor = None

    def grid_pinpoints(self) -> list[list[int]]:
        side = self.tiny.image_size
        return [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        return transformers.LlavaNextConfig(
            vision_config=self.tiny_vision_config(),
            text_config={"model_type": "llama", **self.tiny_text_config(token_ids, vocab_size)},
            image_token_index=token_ids[self.image_token],
            image_grid_pinpoints=self.grid_pinpoints(),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=token_ids[self.tiny_pad],
        )

    def tiny_processor(self, tokenizer: Any) -> Any:
        side = self.tiny.image_size
        return transformers.LlavaNextProcessor(
            image_processor=image_processor(
                "LlavaNext",
                size={"shortest_edge": side},
                crop_size={"height": side, "width": side},
                image_grid_pinpoints=self.grid_pinpoints(),
            ),
            tokenizer=tokenizer,
            patch_size=self.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=self.tiny_chat_template,
        )
