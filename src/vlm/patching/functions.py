"""Patches of module-level functions that attention layers call by name: the rotary embedding.

Hugging Face attention modules look ``apply_rotary_pos_emb`` (and, in releases that have it,
``apply_multimodal_rotary_pos_emb``) up in their modeling module at call time, so replacing the
module attribute reaches every layer. The replacement falls back to the original for any call
whose layout it does not cover. A replacement remembers what it replaces (``_vlm_replaces``), so
a model patched twice, or a second model of the same modeling module, is not wrapped again.
"""

from __future__ import annotations

import sys

from torch import nn

from .report import PatchReport


def _modeling_modules(model: nn.Module) -> set[str]:
    return {type(m).__module__ for m in model.modules() if type(m).__module__.startswith("transformers.models.")}


def patch_rotary(model: nn.Module, report: PatchReport) -> None:
    from vlm.kernels.rope import apply_multimodal_rotary, apply_rotary

    for name in sorted(_modeling_modules(model)):
        module = sys.modules[name]
        standard = getattr(module, "apply_rotary_pos_emb", None)
        if standard is not None and not hasattr(standard, "_vlm_replaces"):

            def rotary(q, k, cos, sin, *args, unsqueeze_dim=1, _original=standard, **kwargs):  # noqa: ANN001
                if args or kwargs or unsqueeze_dim != 1 or cos.dim() != 3:
                    return _original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
                return apply_rotary(q, k, cos, sin)

            rotary._vlm_replaces = standard
            report.replace_attribute(module, "apply_rotary_pos_emb", rotary)
            report.patched["rope"] += 1
        multimodal = getattr(module, "apply_multimodal_rotary_pos_emb", None)
        if multimodal is not None and not hasattr(multimodal, "_vlm_replaces"):

            def mrope(q, k, cos, sin, mrope_section, unsqueeze_dim=1, _original=multimodal):  # noqa: ANN001
                if unsqueeze_dim != 1 or cos.dim() != 4:
                    return _original(q, k, cos, sin, mrope_section, unsqueeze_dim)
                return apply_multimodal_rotary(q, k, cos, sin, list(mrope_section))

            mrope._vlm_replaces = multimodal
            report.replace_attribute(module, "apply_multimodal_rotary_pos_emb", mrope)
            report.patched["rope"] += 1
