"""SmolVLM2 and Idefics3 (SmolVLM v1, Idefics3-8B): a SigLIP tower over the image's tiles and a
downscaled global view, a pixel-shuffle connector, and a Llama-style language model (``model.text_model``).

An image becomes, per tile, ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` per connector
output, rows separated by newlines, then the global view ``<fake_token_around_image><global-img>``
+ ``<image>``... + ``<fake_token_around_image>``; an image no larger than one tile is the global view alone.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers.processing_utils import ProcessorMixin

from .base import LLAMA_STYLE_LINEARS, ModelFamily, image_processor

# Their own templates: "User:" / "Assistant:" turns closed by <end_of_utterance>; a turn opening on an
# image has no space after the colon. The assistant's span starts after "Assistant:", its space included.
_TURNS = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SMOLVLM_CHAT_TEMPLATE = "<|im_start|>" + _TURNS
IDEFICS3_CHAT_TEMPLATE = "<|begin_of_text|>" + _TURNS

IMAGE_MARKUP_TOKENS = ("<fake_token_around_image>", "<global-img>") + tuple(
    f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)
)


class SmolVLMProcessor(transformers.SmolVLMProcessor):
    """SmolVLM's processor for images alone, under its own class name.

    The library's insists on a video processor (which needs torchvision) and on num2words (which
    only video prompts use); images need neither. Pickles by this module's name (DataLoader workers).
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor: Any, tokenizer: Any, image_seq_len: int = 169, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        # What SmolVLMProcessor.__init__ sets before its num2words check.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        # SmolVLM's own reads its video processor's frame settings first.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class SmolVLM(ModelFamily):
    model_type = "smolvlm"
    model_class_name = "SmolVLMForConditionalGeneration"
    processor_class_name = "SmolVLMProcessor"
    image_only_processor = SmolVLMProcessor
    image_processor_stem = "SmolVLM"
    image_token = "<image>"
    vision_tower = "model.vision_model"
    projector = "model.connector"
    language_model = "model.text_model"
    lora_targets = rf"model\.text_model\.layers\.\d+\.{LLAMA_STYLE_LINEARS}"
    # [1, tiles of all the sample's images, C, H, W] and its mask: padded per batch, all-zero tiles are skipped.
    batch_major_image_keys = frozenset({"pixel_values", "pixel_attention_mask"})
    tiny_bos = "<|im_start|>"
    tiny_eos = "<end_of_utterance>"
    tiny_pad = "<|im_end|>"
    tiny_extra_special_tokens = IMAGE_MARKUP_TOKENS
    tiny_chat_template = SMOLVLM_CHAT_TEMPLATE

    patch_size = 8
    scale_factor = 2  # pixel shuffle: 2x2 patches become one token 4x as wide

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        return self.config_class()(
            vision_config=self.tiny_vision_config(),
            text_config={"model_type": "llama", **self.tiny_text_config(token_ids, vocab_size)},
            image_token_id=token_ids[self.image_token],
            scale_factor=self.scale_factor,
            pad_token_id=token_ids[self.tiny_pad],
            tie_word_embeddings=False,
        )

    def config_class(self) -> type:
        return transformers.SmolVLMConfig

    def prepare_loaded(self, model: Any) -> None:
        # Under CUDA autocast the vision tower's layer norms run in fp32, and so, after them, do its
        # 4-bit layers; the modelling code writes the connector's output into the bf16 text embeddings
        # without a cast, which index_put refuses. Other families cast there themselves.
        embedding_dtype = model.get_input_embeddings().weight.dtype

        def in_embedding_dtype(module: Any, args: Any, output: Any) -> Any:
            return output.to(embedding_dtype)

        model.get_submodule(self.projector).register_forward_hook(in_embedding_dtype)

    def tiny_vision_config(self) -> dict[str, Any]:
        return self.tiny_vit_config(self.patch_size)

    def tokens_per_tile(self, image_size: int, patch_size: int, scale_factor: int) -> int:
        return (image_size // patch_size) ** 2 // scale_factor**2

    def tiny_processor(self, tokenizer: Any) -> Any:
        side = self.tiny.image_size
        return self.image_only_processor(
            # Images are scaled to one tile, so each is its global view alone (4 tokens); real checkpoints
            # scale to several tiles and cut them (tests/test_families_new.py builds such a processor).
            image_processor=self.slow_image_processor(side, longest_edge=side),
            tokenizer=tokenizer,
            image_seq_len=self.tokens_per_tile(side, self.patch_size, self.scale_factor),
            chat_template=self.tiny_chat_template,
        )

    def slow_image_processor(self, tile: int, longest_edge: int) -> Any:
        return image_processor(
            self.image_processor_stem,
            do_image_splitting=True,
            size={"longest_edge": longest_edge},
            max_image_size={"longest_edge": tile},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )

    # ---- the full-size architecture (vlm-bench, scripts/bench_step.py) --------------------------
    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 49280) -> transformers.PretrainedConfig:
        """SmolVLM2-2.2B-Instruct's architecture (SigLIP-SO400M at 384 px, SmolLM2-1.7B), tokens at ``token_ids``."""
        return self.config_class()(
            vision_config={
                "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "image_size": 384, "patch_size": 14,
            },
            text_config={
                "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 130_000.0,
                "bos_token_id": token_ids[self.tiny_bos], "eos_token_id": token_ids[self.tiny_eos],
                "pad_token_id": token_ids[self.tiny_pad], "tie_word_embeddings": False,
            },
            image_token_id=token_ids[self.image_token],
            scale_factor=3,
            pad_token_id=token_ids[self.tiny_pad],
            tie_word_embeddings=False,
        )

    def full_size_processor(self, tokenizer: Any) -> Any:
        """The checkpoint's image settings: 384 px tiles of an image scaled to 1536 px, 81 tokens a tile."""
        return self.image_only_processor(
            image_processor=self.slow_image_processor(384, longest_edge=4 * 384),
            tokenizer=tokenizer,
            image_seq_len=self.tokens_per_tile(384, 14, 3),
            chat_template=self.tiny_chat_template,
        )


class Idefics3(SmolVLM):
    """Idefics3 (and SmolVLM v1, whose checkpoints are Idefics3's): SmolVLM2's layout, images only."""

    model_type = "idefics3"
    model_class_name = "Idefics3ForConditionalGeneration"
    processor_class_name = "Idefics3Processor"
    # Its processor needs neither a video processor nor num2words; built from its parts, it gets the PIL
    # image processor (transformers 5.17's AutoProcessor finds only a placeholder for that one).
    image_only_processor = transformers.Idefics3Processor
    image_processor_stem = "Idefics3"
    tiny_bos = "<|begin_of_text|>"
    tiny_pad = "<|end_of_text|>"
    tiny_chat_template = IDEFICS3_CHAT_TEMPLATE

    def config_class(self) -> type:
        return transformers.Idefics3Config

    def full_size_config(self, token_ids: dict[str, int], vocab_size: int = 49155) -> transformers.PretrainedConfig:
        """SmolVLM-Instruct's architecture (an Idefics3: SigLIP-SO400M at 384 px, SmolLM2-1.7B)."""
        config = super().full_size_config(token_ids, vocab_size)
        config.text_config.rope_theta = 273_768.0
        return config
