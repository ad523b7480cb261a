"""Weight memory of a model under a quantization plan: predicted before loading, counted after.

The prediction works on a weightless (meta device) skeleton, so an 11B model's memory under any
policy is known before a byte of it loads; the count walks a loaded model, bitsandbytes' scale
tensors included, and the two agree to the byte on the same model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .formats import weight_bytes

GIB = 1024**3


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of every parameter and buffer of a model under three storage choices."""

    all_16bit: int
    all_4bit: int  # the standard recipe: every linear layer but the output head quantized
    planned: int  # this plan

    @property
    def extra_over_all_4bit(self) -> int:
        return self.planned - self.all_4bit

    def as_dict(self) -> dict[str, float | int]:
        return {
            "all_16bit_bytes": self.all_16bit,
            "all_4bit_bytes": self.all_4bit,
            "planned_bytes": self.planned,
            "extra_over_all_4bit_bytes": self.extra_over_all_4bit,
            "extra_over_all_4bit_fraction": self.extra_over_all_4bit / self.all_4bit,
            "all_16bit_gib": self.all_16bit / GIB,
            "all_4bit_gib": self.all_4bit / GIB,
            "planned_gib": self.planned / GIB,
        }


def human_bytes(n: int | float) -> str:
    """``123456789`` → ``117.7 MiB`` (binary units, sign kept)."""
    size, sign = abs(float(n)), "-" if n < 0 else ""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{sign}{size:.1f} {unit}" if unit != "B" else f"{sign}{int(size)} B"
        size /= 1024
    return f"{sign}{size:.2f} GiB"


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``name → (out_features, in_features)`` of every ``nn.Linear`` (4-bit layers report their original shape)."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def predicted_bytes(
    model: nn.Module,
    quantized: Iterable[str],
    method: str,
    double_quant: bool = True,
    dtype_bytes: int = 2,
) -> int:
    """Bytes ``model``'s weights take once ``quantized`` linear layers are stored as ``method``.

    ``model`` may be a meta-device skeleton. Parameters are counted at ``dtype_bytes`` (the
    16-bit compute dtype they load in), buffers at their own element size.
    """
    quantized_weights = {f"{name}.weight" for name in quantized}
    shapes = linear_shapes(model)
    total = 0
    for name, parameter in model.named_parameters():
        if name in quantized_weights and method != "none":
            total += weight_bytes(shapes[name.removesuffix(".weight")], method, double_quant, dtype_bytes)
        else:
            total += parameter.numel() * dtype_bytes
    for buffer in model.buffers():
        total += buffer.numel() * buffer.element_size()
    return total


def weight_memory(
    model: nn.Module,
    quantized: Iterable[str],
    all_4bit: Iterable[str],
    method: str,
    double_quant: bool = True,
    dtype_bytes: int = 2,
) -> WeightMemory:
    """Predicted bytes of ``model`` in 16-bit, in the standard all-4-bit recipe, and under this plan."""
    four_bit = method if method in ("nf4", "fp4") else "nf4"
    return WeightMemory(
        all_16bit=predicted_bytes(model, (), "none", dtype_bytes=dtype_bytes),
        all_4bit=predicted_bytes(model, all_4bit, four_bit, double_quant, dtype_bytes),
        planned=predicted_bytes(model, quantized, method, double_quant, dtype_bytes),
    )


def stored_bytes(model: nn.Module) -> int:
    """Bytes a loaded model's weights occupy: parameters, buffers and bitsandbytes' quantization state."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def count(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None or not isinstance(tensor, torch.Tensor):
            return
        key = (str(tensor.device), tensor.data_ptr())
        if key in seen:
            return
        seen.add(key)
        total += tensor.numel() * tensor.element_size()

    for parameter in model.parameters():
        count(parameter)
        state = getattr(parameter, "quant_state", None)
        while state is not None:  # 4-bit: absmax and code, then the nested absmax state
            count(state.absmax)
            count(state.code)
            count(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        count(getattr(parameter, "SCB", None))  # 8-bit: the per-row scales
    for buffer in model.buffers():
        count(buffer)
    return total
