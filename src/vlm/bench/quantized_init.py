"""A random-init checkpoint made directly in 4-bit, for an architecture too large to hold in 16-bit.

The model is built on the meta device (shapes, no memory). Then each planned 4-bit linear gets
seeded random bf16 weights and is quantized at once, one layer at a time, so that the model is never
whole in 16-bit: the largest 16-bit tensor alive is one layer's weight, besides the parts the plan
keeps in 16-bit. The rest of the weights (norms, embeddings, kept layers) are made in bf16.

It is saved as bitsandbytes serializes a quantized model, with the quantization in ``config.json``,
so ``from_pretrained`` loads it like any pre-quantized checkpoint: the path a real one takes. For
Llama-3.2-90B-Vision that is about 50 GB on disk, where its 16-bit checkpoint would be 180 GB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.models.families import ModelFamily
from vlm.quant.config import QuantConfig
from vlm.quant.policies import QuantPlan, linear_layer_names

INIT_STD = 0.02  # transformers' default initializer_range


def save_random_init_4bit(
    family: ModelFamily, config: Any, path: Path, quant: QuantConfig = QuantConfig(), device: str = "cuda",
    finish: Callable[[nn.Module], None] | None = None,
) -> QuantPlan:
    """``family``'s model of ``config`` with seeded random weights, its linears quantized as ``quant``
    plans them as they are made; saved pre-quantized to ``path``. ``finish`` changes the model before
    it is saved. Returns the plan (which layers are 4-bit)."""
    from vlm.models.loading import bitsandbytes_config, model_skeleton

    if not quant.quantizes or quant.method not in ("nf4", "fp4") or quant.calibrates:
        raise ValueError(f"a 4-bit random init needs quant.method nf4 or fp4 and a fixed policy, got {quant}")
    model = model_skeleton(family, config)
    plan = quant.resolve(linear_layer_names(model), family.parts)
    generator = torch.Generator(device).manual_seed(0)
    for name in plan.quantized:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _random_linear_4bit(owner.get_submodule(child), quant, device, generator))
    _materialize_the_rest(model, device, generator)
    if finish is not None:
        finish(model)
    model.config.quantization_config = bitsandbytes_config(quant, plan.kept)
    model.save_pretrained(path)
    return plan


def _random_linear_4bit(linear: nn.Linear, quant: QuantConfig, device: str, generator: torch.Generator) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=quant.torch_compute_dtype,
        compress_statistics=quant.double_quant, quant_type=quant.method, quant_storage=quant.torch_quant_storage,
        device="meta",
    )
    weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device)
    weight.normal_(0.0, INIT_STD, generator=generator)
    layer.weight = _params_4bit(
        weight, requires_grad=False, compress_statistics=quant.double_quant, quant_type=quant.method,
        quant_storage=quant.torch_quant_storage,
    ).to(device)  # quantized here; the 16-bit weight is freed with this function's frame
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=torch.bfloat16, device=device),
                                  requires_grad=False)
    return layer


def _params_4bit(weight: torch.Tensor, **kwargs: Any) -> nn.Parameter:
    """The one place a 16-bit weight is handed to bitsandbytes (Linear4bit makes Params4bit of its own,
    so this is what a check of the 16-bit weights alive at once watches)."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(weight, **kwargs)


def _materialize_the_rest(model: nn.Module, device: str, generator: torch.Generator) -> None:
    """Random bf16 values for every parameter still on the meta device (a tied one stays tied); the
    buffers on it are recomputed when the checkpoint loads, so none of them may be persistent."""
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if not parameter.is_meta:
                continue
            if id(parameter) not in made:
                made[id(parameter)] = nn.Parameter(_random_value(name, parameter, device, generator), requires_grad=False)
            module._parameters[name] = made[id(parameter)]
        persistent = [n for n, b in module.named_buffers(recurse=False)
                      if b.is_meta and n not in module._non_persistent_buffers_set]
        if persistent:
            raise ValueError(f"{module_name}: persistent buffers {persistent} would be saved without values")
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)


def _random_value(name: str, like: torch.Tensor, device: str, generator: torch.Generator) -> torch.Tensor:
    value = torch.empty(like.shape, dtype=torch.bfloat16, device=device)
    if like.dim() == 1 and name == "bias":
        return value.zero_()
    if like.dim() == 1 and name == "weight":  # a norm's scale
        return value.fill_(1.0)
    return value.normal_(0.0, INIT_STD, generator=generator)
