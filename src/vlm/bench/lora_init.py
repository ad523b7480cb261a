"""Every recipe of a benchmark starts from the same LoRA weights, and reports its first grads weight by weight.

PEFT draws each adapter's A from the global random stream when it wraps a layer, so recipes that load and wrap
their models in different orders start from different A: their losses part from the first update on, for reasons
no computation of theirs explains. Here each A is drawn again from a stream of its own, seeded by the weight's
name as every recipe spells it, from PEFT's default distribution, and each B is zero (PEFT's default). The first
step's grads are then the same quantities in every recipe, and comparing their norms weight by weight compares
the recipes' backward passes before any update has run.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

_WRAPPERS = ("model", "base_model")  # the leading names a PEFT wrapper and the model classes put before the layers


def adapter_key(name: str) -> str | None:
    """The name of a LoRA A or B weight as every recipe spells it, without the wrappers' leading names and the
    adapter's (``language_model.layers.0.self_attn.q_proj.lora_A.weight``); ``None`` for any other weight."""
    parts = name.split(".")
    kind = next((i for i, part in enumerate(parts) if part in ("lora_A", "lora_B")), None)
    if kind is None or parts[-1] != "weight":
        return None
    module = parts[:kind]
    while module and module[0] in _WRAPPERS:
        module = module[1:]
    return ".".join([*module, parts[kind], "weight"])


def same_lora_init(model: nn.Module) -> int:
    """Draw each LoRA A of ``model`` again from a stream seeded by its :func:`adapter_key`, uniform in
    ``±1/sqrt(in_features)`` (PEFT's default, Kaiming-uniform with ``a = sqrt(5)``), and zero each B; returns the
    number of adapted layers. Adapters that another init made (``init_lora_weights`` other than PEFT's default:
    PiSSA and LoftQ change the base weights to match theirs) are left as they are, and 0 is returned. Raises
    ``ValueError`` where ``model`` has no LoRA weights."""
    weights = [(key, weight) for name, weight in model.named_parameters() if (key := adapter_key(name)) is not None]
    if not weights:
        raise ValueError("the model has no LoRA weights to initialise")
    configs = getattr(model, "peft_config", None) or {}
    if any(getattr(config, "init_lora_weights", True) is not True for config in configs.values()):
        return 0
    adapted = 0
    with torch.no_grad():
        for key, weight in weights:
            if key.endswith("lora_B.weight"):
                weight.zero_()
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            bound = weight.shape[1] ** -0.5
            weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))
            adapted += 1
    return adapted


def lora_grad_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """The norm of each LoRA weight's grad, by :func:`adapter_key`, as device tensors (read them after the timing:
    reading one waits for the device)."""
    return {key: weight.grad.detach().float().norm() for name, weight in model.named_parameters()
            if (key := adapter_key(name)) is not None and weight.grad is not None}
