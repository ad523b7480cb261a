"""The registry of model families, keyed by the Hugging Face ``model_type`` of their checkpoints."""

from __future__ import annotations

from .base import ModelFamily, TinySize
from .llava import Llava, LlavaNext
from .mllama import Mllama
from .qwen2_vl import Qwen2VL, Qwen25VL

FAMILIES: dict[str, type[ModelFamily]] = {
    cls.model_type: cls for cls in (Llava, LlavaNext, Mllama, Qwen2VL, Qwen25VL)
}


def get_family(model_type: str) -> ModelFamily:
    """The family adapter for a ``model_type``; raises ``ValueError`` listing the known ones."""
    try:
        cls = FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model.family={model_type!r} is not a supported family; known: {', '.join(sorted(FAMILIES))}"
        ) from None
    return cls()


__all__ = ["FAMILIES", "ModelFamily", "TinySize", "get_family"]
