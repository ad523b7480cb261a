"""Wrapping a loaded model with PEFT LoRA adapters and setting up gradient checkpointing."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .families import ModelFamily


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters. ``target_modules="auto"`` uses the family's language-model linears;
    otherwise a list of short module names (``["q_proj", "v_proj"]``) or one regex over full names."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "auto"
    use_rslora: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora.r={self.r!r} must be a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: give 'auto', a list of module names or a regex")


def apply_lora(model: nn.Module, family: ModelFamily, settings: LoraSettings) -> PeftModel:
    """Freeze ``model`` and add LoRA adapters; the adapters are fp32, the frozen weights keep their dtype."""
    targets = family.lora_targets if settings.target_modules == "auto" else settings.target_modules
    if isinstance(targets, tuple):
        targets = list(targets)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.use_rslora,
        bias="none",
        **settings.extra,
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs need no grad hook)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
