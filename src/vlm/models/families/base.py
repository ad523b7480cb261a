"""What a model family is: where its parts live, its image token, its LoRA targets, its tiny variant.

A family is keyed by the Hugging Face ``model_type`` of its checkpoints. Everything else in the
project asks the family instead of branching on model names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import transformers

from vlm.errors import ConfigError
from vlm.quant.policies import ModelParts

# Every linear layer of a decoder block of a Llama-style language model: the standard QLoRA targets.
LLAMA_STYLE_LINEARS = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass(frozen=True)
class TinySize:
    """Sizes of the tiny variant of a family: small enough to train on two CPU cores in seconds.

    Every width is a multiple of 64 and every head 64 wide, as in real checkpoints: bitsandbytes'
    CPU kernels assume such widths (see :func:`vlm.quant.bnb_layers.misread_on_cpu`), and so do
    the fast paths of attention and of our kernels.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    vision_hidden_size: int = 64
    vision_heads: int = 1
    vision_layers: int = 2
    image_size: int = 32


@dataclass(frozen=True)
class ModelFamily:
    """Where a vision-language family keeps its parts, as full module names of the loaded model.

    ``vision_tower``, ``projector`` and ``language_model`` are module-name prefixes;
    ``cross_attention_out`` is a regex over full module names (families without cross-attention
    leave it ``None``); ``lora_targets`` is a regex that PEFT full-matches against module names.
    ``batch_major_image_keys`` names the processor outputs that carry a leading batch dimension
    (the rest of the image tensors are stacked per image), which is all collation needs to know.
    """

    model_type: ClassVar[str]
    model_class_name: ClassVar[str]
    processor_class_name: ClassVar[str]
    image_token: ClassVar[str]
    vision_tower: ClassVar[str]
    projector: ClassVar[str]
    language_model: ClassVar[str] = "model.language_model"
    cross_attention_out: ClassVar[str | None] = None
    lora_targets: ClassVar[str]
    batch_major_image_keys: ClassVar[frozenset[str]] = frozenset()
    # Batch-major masks over an image's tiles, whose padded image slots keep one tile open.
    tile_mask_keys: ClassVar[frozenset[str]] = frozenset()
    # Where the checkpoint's processor class insists on parts images do not need (Qwen's video
    # processor, which needs torchvision): the class to build instead, from the image processor
    # and the tokenizer alone. None: the checkpoint's own processor class loads as it is.
    image_only_processor: ClassVar[type | None] = None
    # Special tokens the tiny tokenizer needs: (bos, eos, pad) and the rest.
    tiny_bos: ClassVar[str | None] = None
    tiny_eos: ClassVar[str]
    tiny_pad: ClassVar[str]
    tiny_extra_special_tokens: ClassVar[tuple[str, ...]] = ()
    tiny_chat_template: ClassVar[str]
    # The oldest transformers release with the family's classes that this project runs on.
    min_transformers: ClassVar[str] = "5.17"

    tiny: TinySize = field(default_factory=TinySize)

    # ---- classes -------------------------------------------------------------------------------
    def check_installed(self) -> None:
        """Raise ``ConfigError`` naming the transformers release the family needs when the installed
        one lacks its model or processor class."""
        missing = [name for name in (self.model_class_name, self.processor_class_name) if not hasattr(transformers, name)]
        if missing:
            raise ConfigError(
                f"model.family={self.model_type} needs transformers >= {self.min_transformers} "
                f"(it has no {', '.join(missing)}); installed: {transformers.__version__}"
            )

    @property
    def model_class(self) -> type:
        return getattr(transformers, self.model_class_name)

    @property
    def processor_class(self) -> type:
        return getattr(transformers, self.processor_class_name)

    # ---- module names --------------------------------------------------------------------------
    @property
    def parts(self) -> ModelParts:
        """Where the parts live that 4-bit quantization hurts most, for the skip-layer policies."""
        return ModelParts(
            vision=(self.vision_tower,), projector=(self.projector,), cross_attention_out=self.cross_attention_out
        )

    def decoder_layer_classes(self, model: Any) -> frozenset[type]:
        """The classes of the language model's decoder layers in ``model`` (loaded, PEFT-wrapped or
        a skeleton): the modules of its ``<language_model>.layers`` stack, where nearly all the
        weights and activations are; the units FSDP shards (Mllama has two kinds, self- and
        cross-attention layers).

        Raises ``ValueError`` when ``model`` has no such stack.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = f"{self.language_model}.layers"
        try:
            layers = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(base).__name__} has no decoder layer stack {name!r}") from None
        return frozenset(type(layer) for layer in layers)

    # ---- tiny variant --------------------------------------------------------------------------
    def tiny_special_tokens(self) -> list[str]:
        tokens = [self.tiny_bos, self.tiny_eos, self.tiny_pad, self.image_token, *self.tiny_extra_special_tokens]
        return list(dict.fromkeys(t for t in tokens if t))

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int) -> transformers.PretrainedConfig:
        """The family's config at tiny size; ``token_ids`` maps each special token to its id."""
        raise NotImplementedError

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A processor for the tiny variant around a locally built tokenizer (slow PIL image processor)."""
        raise NotImplementedError

    def finish_tiny_init(self, model: Any) -> None:
        """Adjust a freshly initialised tiny model where random init differs from any trained checkpoint."""

    def tiny_vit_config(self, patch_size: int, **extra: Any) -> dict[str, Any]:
        """A ViT vision tower (CLIP, SigLIP) at tiny size: the keys their configs share."""
        size = self.tiny
        return {
            "hidden_size": size.vision_hidden_size,
            "intermediate_size": 2 * size.vision_hidden_size,
            "num_hidden_layers": size.vision_layers,
            "num_attention_heads": size.vision_heads,
            "image_size": size.image_size,
            "patch_size": patch_size,
            **extra,
        }

    def keep_only_used_tower_states(self, tower: Any) -> str | None:
        """Make a vision tower that runs without autograd drop the layer outputs its own output does not use
        (say how, for the build report), where the family's code holds them all; ``None``: nothing to drop."""
        return None

    def prepare_loaded(self, model: Any) -> None:
        """Fix what the family's modelling code gets wrong in training, once the model is loaded."""

    def tiny_text_config(self, token_ids: dict[str, int], vocab_size: int, **overrides: Any) -> dict[str, Any]:
        """The language model's config at tiny size, its special tokens pointing into the tiny vocabulary
        (left at a family's defaults they would point past its end, and transformers says so)."""
        size = self.tiny
        return {
            "vocab_size": vocab_size,
            "bos_token_id": token_ids.get(self.tiny_bos) if self.tiny_bos else None,
            "eos_token_id": token_ids[self.tiny_eos],
            "hidden_size": size.hidden_size,
            "intermediate_size": size.intermediate_size,
            "num_hidden_layers": size.num_layers,
            "num_attention_heads": size.num_heads,
            "num_key_value_heads": size.num_kv_heads,
            "max_position_embeddings": 4096,
            "pad_token_id": token_ids[self.tiny_pad],
            "tie_word_embeddings": False,
            # Wider than the usual 0.02: at hidden size 64 the frozen random output head could
            # otherwise not produce confident logits, and LoRA would have little to learn with.
            "initializer_range": 0.15,
            **overrides,
        }


def image_processor(class_stem: str, **kwargs: Any) -> Any:
    """The slow (PIL) image processor of a family, under the name the installed transformers uses.

    Newer 5.x releases call it ``<Stem>ImageProcessorPil``; earlier ones ``<Stem>ImageProcessor``.
    The slow one is chosen because it needs no torchvision.
    """
    return slow_image_processor_class(f"{class_stem}ImageProcessor")(**kwargs)


def image_only(processor_class: type, module: str) -> type:
    """``processor_class`` without its video processor, under the same class name.

    Qwen's processors insist on a video processor, which needs torchvision; images alone need only
    the image processor and the tokenizer. The subclass keeps the name so that what it saves reads
    as the original processor class; bind it to that name at the top of ``module`` so that it
    pickles (DataLoader workers started with spawn receive the processor by pickling).
    """

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    ImageOnlyProcessor.__module__ = module
    return ImageOnlyProcessor


def slow_image_processor_class(image_processor_type: str) -> type:
    """The PIL-backed class for an ``image_processor_type`` saved in a checkpoint.

    Checkpoints name the fast class or the plain one; the slow class is ``<Stem>ImageProcessorPil``
    in newer transformers 5.x and ``<Stem>ImageProcessor`` in earlier ones.
    """
    stem = image_processor_type.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, f"{stem}Pil", None) or getattr(transformers, stem, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no image processor {image_processor_type!r}")
    if cls.__qualname__.endswith("Placeholder"):
        # transformers 5.17 guesses that SmolVLM's and Idefics3's PIL processors need torchvision (their
        # files name it) and lists a placeholder; the class itself imports from its module.
        cls = getattr(importlib.import_module(cls.__module__), cls.__name__)
    return cls
