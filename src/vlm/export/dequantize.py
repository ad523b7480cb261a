"""A bitsandbytes-quantized model turned back into a plain one: every 4-bit or 8-bit linear layer
becomes an ``nn.Linear`` holding its dequantized weight, and the model forgets it was quantized.

The adapter was trained against the dequantized weights (a 4-bit layer computes with exactly
them), so merging into them reproduces the trained model; merging into the original 16-bit
checkpoint would not.
"""

from __future__ import annotations

import torch
from torch import nn

# What transformers leaves on a model loaded with a quantization config; a plain model has none of it.
_QUANTIZED_MODEL_ATTRIBUTES = ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` computes with, ``[out, in]``."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes quantized linear layer")


def plain_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` in ``dtype`` computing what the quantized ``layer`` computes."""
    weight = dequantized_weight(layer).to(dtype)
    with torch.device("meta"):  # no random init of a weight that is replaced at once
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


def dequantize_linear_layers(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace every quantized linear layer of ``model`` by :func:`plain_linear`, in place; their names.

    Layers are replaced one at a time, so the model never holds more than one extra layer.
    """
    from vlm.quant.bnb_layers import quantized_layer_names

    names = quantized_layer_names(model)
    for name in names:
        model.set_submodule(name, plain_linear(model.get_submodule(name), dtype))
    _forget_quantization(model)
    return names


def _forget_quantization(model: nn.Module) -> None:
    """Drop what marks ``model`` as quantized, so that ``save_pretrained`` writes a plain checkpoint
    (no ``quantization_config`` in config.json) and PEFT merges into plain layers."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for name in _QUANTIZED_MODEL_ATTRIBUTES:
        if name in vars(model):
            delattr(model, name)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
