"""Gemma 3 (image-text): a SigLIP tower whose pooled patches are projected into a Gemma 3 language model
with local and global attention layers, q/k RMSNorm, ``(1 + weight)`` RMSNorms and a GeGLU MLP."""

from __future__ import annotations

from typing import Any

import transformers

from .base import LLAMA_STYLE_LINEARS, ModelFamily, image_processor

# Gemma's turns: the assistant is "model", a system message opens the first user turn, text parts are
# trimmed, and an image renders as <start_of_image>, which the processor expands to
# "\n\n<start_of_image>" + <image_soft_token> per pooled patch + "<end_of_image>\n\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# What Gemma 3's processor reads from its tokenizer by name.
NAMED_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


class Gemma3(ModelFamily):
    model_type = "gemma3"
    model_class_name = "Gemma3ForConditionalGeneration"
    processor_class_name = "Gemma3Processor"
    # The token the model's image features replace; in rendered text an image is <start_of_image>.
    image_token = "<image_soft_token>"
    vision_tower = "model.vision_tower"
    # Pooling, a (1 + w) RMSNorm and a plain weight matrix: it holds no linear layer.
    projector = "model.multi_modal_projector"
    lora_targets = rf"model\.language_model\.layers\.\d+\.{LLAMA_STYLE_LINEARS}"
    tiny_bos = "<bos>"
    tiny_eos = "<end_of_turn>"
    tiny_pad = "<pad>"
    tiny_extra_special_tokens = ("<eos>", "<start_of_turn>", "<start_of_image>", "<end_of_image>")
    tiny_chat_template = GEMMA3_CHAT_TEMPLATE

    patch_size = 8
    tokens_per_image = 4  # 4x4 patches average-pooled 2x2

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        size = self.tiny
        text = self.tiny_text_config(
            token_ids,
            vocab_size,
            model_type="gemma3_text",
            head_dim=size.hidden_size // size.num_heads,
            query_pre_attn_scalar=size.hidden_size // size.num_heads,
            hidden_activation="gelu_pytorch_tanh",
            # One local (sliding-window) layer and one global one, as the real 5:1 pattern has both.
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=32,
            tie_word_embeddings=True,
        )
        return transformers.Gemma3Config(
            text_config=text,
            vision_config=self.tiny_vit_config(
                self.patch_size, model_type="siglip_vision_model", vision_use_head=False
            ),
            mm_tokens_per_image=self.tokens_per_image,
            boi_token_index=token_ids["<start_of_image>"],
            eoi_token_index=token_ids["<end_of_image>"],
            image_token_index=token_ids[self.image_token],
            tie_word_embeddings=True,
        )

    def tiny_processor(self, tokenizer: Any) -> Any:
        side = self.tiny.image_size
        return transformers.Gemma3Processor(
            image_processor=image_processor(
                "Gemma3", size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ),
            tokenizer=with_named_tokens(tokenizer, NAMED_TOKENS),
            image_seq_length=self.tokens_per_image,
            chat_template=self.tiny_chat_template,
        )

    # ---- the full-size architecture (vlm-bench, scripts/bench_step.py) --------------------------
    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 262208) -> transformers.PretrainedConfig:
        """gemma-3-4b-it's architecture, its special tokens at ``token_ids``."""
        pattern = ["sliding_attention"] * 5 + ["full_attention"]
        return transformers.Gemma3Config(
            text_config={
                "model_type": "gemma3_text", "vocab_size": vocab_size, "hidden_size": 2560, "intermediate_size": 10240,
                "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                "query_pre_attn_scalar": 256, "sliding_window": 1024, "layer_types": (pattern * 6)[:34],
                "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh",
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                },
                "bos_token_id": token_ids[self.tiny_bos], "eos_token_id": token_ids[self.tiny_eos],
                "pad_token_id": token_ids[self.tiny_pad],
            },
            vision_config={
                "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                "vision_use_head": False,
            },
            mm_tokens_per_image=256,
            boi_token_index=token_ids["<start_of_image>"],
            eoi_token_index=token_ids["<end_of_image>"],
            image_token_index=token_ids[self.image_token],
        )

    def full_size_processor(self, tokenizer: Any) -> Any:
        """The checkpoint's image settings: 896 px square, 256 tokens an image."""
        return transformers.Gemma3Processor(
            image_processor=image_processor(
                "Gemma3", size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ),
            tokenizer=with_named_tokens(tokenizer, NAMED_TOKENS),
            image_seq_length=256,
            chat_template=self.tiny_chat_template,
        )


def with_named_tokens(tokenizer: Any, named: dict[str, str]) -> Any:
    """``tokenizer`` with ``named`` special tokens as attributes (``tokenizer.boi_token``), saved in its
    config as a real checkpoint's are; a fast tokenizer around the same vocabulary."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        padding_side=tokenizer.padding_side,
        extra_special_tokens=named,
        chat_template=tokenizer.chat_template,
    )
