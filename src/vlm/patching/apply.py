"""The one entry point that patches the enabled kernels into a model."""

from __future__ import annotations

from torch import nn

from . import functions, loss, modules
from .report import PatchReport
from .settings import KernelSettings


def apply_kernels(model: nn.Module, settings: KernelSettings) -> PatchReport:
    """Patch the enabled kernels into ``model`` (after LoRA, before gradient checkpointing);
    the report's ``undo()`` takes them all back. ``settings`` are resolved for the model's device
    (:meth:`KernelSettings.resolved`): an ``auto`` left in them is refused."""
    settings.enabled()  # refuses auto switches, which would read as on
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
