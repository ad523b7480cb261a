"""Which kernels to patch in (config) and the one entry point that patches them."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import nn

KERNELS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy", "lora")


@dataclass(frozen=True)
class KernelSettings:
    """One switch per kernel, so that an ablation can sweep them (``kernels.rms_norm=false``)."""

    rms_norm: bool = False
    layer_norm: bool = False
    rope: bool = False
    swiglu: bool = False
    geglu: bool = False
    cross_entropy: bool = False
    lora: bool = False

    def enabled(self) -> list[str]:
        return [name for name, on in asdict(self).items() if on]


@dataclass
class PatchReport:
    """How many places each kernel was patched into, and what was left alone and why."""

    patched: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # "kernel: reason" → count

    def summary(self) -> str:
        done = ", ".join(f"{name} ×{n}" for name, n in sorted(self.patched.items())) or "none"
        left = ", ".join(f"{why} ×{n}" for why, n in sorted(self.skipped.items()))
        return f"kernels patched: {done}" + (f"; left alone: {left}" if left else "")


def apply_kernels(model: nn.Module, settings: KernelSettings) -> PatchReport:
    """Patch the enabled kernels into ``model`` (after LoRA, before gradient checkpointing)."""
    from . import functions, loss, modules

    report = PatchReport()
    if settings.rms_norm:
        modules.patch_rms_norms(model, report)
    if settings.layer_norm:
        modules.patch_layer_norms(model, report)
    if settings.swiglu or settings.geglu:
        modules.patch_gated_mlps(model, report, swiglu=settings.swiglu, geglu=settings.geglu)
    if settings.lora:
        modules.patch_qlora_linears(model, report)
    if settings.rope:
        functions.patch_rotary(model, report)
    if settings.cross_entropy:
        loss.patch_fused_cross_entropy(model, report)
    return report
