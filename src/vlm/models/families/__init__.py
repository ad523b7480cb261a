"""The registry of model families, keyed by the Hugging Face ``model_type`` of their checkpoints."""

from __future__ import annotations

from .base import ModelFamily, TinySize
from .gemma3 import Gemma3
from .llava import Llava, LlavaNext
from .mllama import Mllama
from .qwen2_vl import Qwen2VL, Qwen25VL
from .qwen3_vl import Qwen3VL
from .smolvlm import Idefics3, SmolVLM

FAMILIES: dict[str, type[ModelFamily]] = {
    cls.model_type: cls for cls in (Llava, LlavaNext, Mllama, Qwen2VL, Qwen25VL, Qwen3VL, Gemma3, SmolVLM, Idefics3)
}


def get_family(model_type: str) -> ModelFamily:
    """The family adapter for a ``model_type``; raises ``ValueError`` listing the known ones, and
    ``ConfigError`` naming the transformers release it needs when the installed one lacks its classes."""
    try:
        cls = FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model.family={model_type!r} is not a supported family; known: {', '.join(sorted(FAMILIES))}"
        ) from None
    family = cls()
    family.check_installed()
    return family


__all__ = ["FAMILIES", "ModelFamily", "TinySize", "get_family"]
