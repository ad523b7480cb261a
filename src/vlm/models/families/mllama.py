"""Llama 3.2 Vision (Mllama): a tiled ViT whose features enter the language model through gated cross-attention layers."""

from __future__ import annotations

import types
from typing import Any

import transformers
from transformers.modeling_outputs import BaseModelOutput

from .base import LLAMA_STYLE_LINEARS, ModelFamily, image_processor

# Llama 3 headers; an image is the single <|image|> token the cross-attention layers attend from.
MLLAMA_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class Mllama(ModelFamily):
    model_type = "mllama"
    model_class_name = "MllamaForConditionalGeneration"
    processor_class_name = "MllamaProcessor"
    image_token = "<|image|>"
    vision_tower = "model.vision_model"
    projector = "model.multi_modal_projector"
    cross_attention_out = r"model\.language_model\.layers\.\d+\.cross_attn\.o_proj"
    # Self- and cross-attention projections share their short names, so one pattern covers both.
    lora_targets = rf"model\.language_model\.layers\.\d+\.({LLAMA_STYLE_LINEARS}|cross_attn\.(q|k|v|o)_proj)"
    batch_major_image_keys = frozenset({"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"})
    tile_mask_keys = frozenset({"aspect_ratio_mask"})
    tiny_bos = "<|begin_of_text|>"
    tiny_eos = "<|eot_id|>"
    tiny_pad = "<|finetune_right_pad_id|>"
    tiny_extra_special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<|python_tag|>")
    tiny_chat_template = MLLAMA_CHAT_TEMPLATE

    max_image_tiles = 4

    def keep_only_used_tower_states(self, tower: Any) -> str | None:
        # Both encoders return every layer's output (fp32 under autocast: 33 MB each for 4 tiles of 560 px),
        # and the tower reads only `intermediate_layers_indices` of the local encoder's, none of the global
        # one's. Without autograd nothing else holds them: kept, they were the step's peak (1.3 GB at 2048 tokens).
        local, global_ = tower.transformer, tower.global_transformer
        used = frozenset(index % len(local.layers) for index in tower.intermediate_layers_indices)
        local.forward = types.MethodType(_encoder_forward_keeping(used), local)
        global_.forward = types.MethodType(_encoder_forward_keeping(frozenset()), global_)
        return f"keeping {len(used)} of its {len(local.layers) + len(global_.layers)} layer outputs"

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        size = self.tiny
        # Mllama's text model adds 8 embedding rows of its own above vocab_size for its special tokens.
        text = self.tiny_text_config(token_ids, vocab_size, num_hidden_layers=3, cross_attention_layers=[1])
        return transformers.MllamaConfig(
            vision_config={
                "hidden_size": size.vision_hidden_size,
                "intermediate_size": 2 * size.vision_hidden_size,
                "num_hidden_layers": size.vision_layers,
                "num_global_layers": 1,
                "num_attention_heads": size.vision_heads,
                "image_size": size.image_size,
                "patch_size": 8,
                "max_num_tiles": self.max_image_tiles,
                "vision_output_dim": 2 * size.vision_hidden_size,
                "intermediate_layers_indices": [0],
            },
            text_config=text,
            image_token_index=token_ids[self.image_token],
        )

    def finish_tiny_init(self, model: Any) -> None:
        # Fresh cross-attention gates are zero (tanh(0) = 0), which would cut the cross-attention
        # layers out of the forward and backward pass; trained checkpoints have them open.
        import torch

        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    parameter.fill_(1.0)

    def tiny_processor(self, tokenizer: Any) -> Any:
        side = self.tiny.image_size
        return transformers.MllamaProcessor(
            image_processor=image_processor(
                "Mllama", size={"height": side, "width": side}, max_image_tiles=self.max_image_tiles
            ),
            tokenizer=tokenizer,
            chat_template=self.tiny_chat_template,
        )


def _encoder_forward_keeping(used: frozenset[int]):  # noqa: ANN202
    """``MllamaVisionEncoder.forward`` returning only the outputs of the layers in ``used`` (``None`` elsewhere,
    so that the tower's indexing stays as it is)."""

    def forward(self, hidden_states, attention_mask=None, **_):  # noqa: ANN001, ANN003, ANN202
        kept = []
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, attention_mask=attention_mask)  # positional: its name differs by version
            kept.append(hidden_states if index in used else None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(kept))

    return forward
