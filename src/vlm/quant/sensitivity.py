"""How much quantizing each linear layer alone disturbs it, measured on real inputs.

For every layer, on calibration batches run through the 16-bit model:

- ``weight_error``: ``‖W − Q(W)‖ / ‖W‖``, the weight's relative round-trip error;
- ``output_error``: ``‖x (W − Q(W))ᵀ‖ / ‖x Wᵀ‖`` over all calibration inputs ``x`` the layer
  saw, which is large where outlier weights meet outlier activations;
- ``kl`` (optional, one forward pass per layer and batch): the KL divergence of the final
  logits when that layer alone is quantized.

Hooks see one layer at a time, so the only extra memory is one layer's round-trip weight.
Works on any module tree of ``nn.Linear`` layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .fidelity import Batch, Forward, Positions, fidelity, reference_log_probs
from .formats import round_trip
from .simulate import simulated_quantization


@dataclass
class LayerError:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    order: int | None = None  # position in execution order; None if no calibration input reached it
    weight_error: float | None = None
    output_error: float | None = None
    kl: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerError:
        return cls(**{**data, "shape": tuple(data["shape"])})


class _ErrorAccumulator:
    """Forward hook of one layer: sums ‖x ΔWᵀ‖² and ‖x Wᵀ‖² over every call."""

    def __init__(self, method: str, double_quant: bool, order: list[str], name: str) -> None:
        self.method, self.double_quant = method, double_quant
        self.order, self.name = order, name
        self.error_sq = self.signal_sq = 0.0
        self.weight_error: float | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        if self.name not in self.order:
            self.order.append(self.name)
        weight = module.weight
        delta = weight.float() - round_trip(weight, self.method, self.double_quant).float()
        if self.weight_error is None:
            self.weight_error = float(delta.norm() / weight.float().norm().clamp_min(1e-30))
        x = args[0].reshape(-1, module.in_features).float()
        self.error_sq += float((x @ delta.T).square().sum())
        clean = output.reshape(-1, module.out_features).float()
        if module.bias is not None:
            clean = clean - module.bias.float()
        self.signal_sq += float(clean.square().sum())

    @property
    def output_error(self) -> float | None:
        if not self.signal_sq and not self.error_sq:
            return None
        return (self.error_sq / max(self.signal_sq, 1e-30)) ** 0.5


@torch.no_grad()
def measure_layers(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Batch],
    forward: Forward,
    method: str,
    double_quant: bool = True,
) -> list[LayerError]:
    """Weight and output error of every layer in ``names`` on ``batches``, in execution order."""
    order: list[str] = []
    accumulators = {name: _ErrorAccumulator(method, double_quant, order, name) for name in names}
    handles = [model.get_submodule(name).register_forward_hook(acc) for name, acc in accumulators.items()]
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    position = {name: i for i, name in enumerate(order)}
    layers = []
    for name, acc in accumulators.items():
        module = model.get_submodule(name)
        weight_error = acc.weight_error
        if weight_error is None:  # never ran: its weight error is still worth reporting
            delta = module.weight.float() - round_trip(module.weight, method, double_quant).float()
            weight_error = float(delta.norm() / module.weight.float().norm().clamp_min(1e-30))
        layers.append(
            LayerError(
                name=name,
                shape=(module.out_features, module.in_features),
                order=position.get(name),
                weight_error=weight_error,
                output_error=acc.output_error,
            )
        )
    # Execution order first (the depth of the model), layers never reached after it.
    layers.sort(key=lambda layer: (layer.order is None, layer.order if layer.order is not None else 0))
    return layers


@torch.no_grad()
def measure_end_to_end(
    model: nn.Module,
    layers: Sequence[LayerError],
    batches: Sequence[Batch],
    forward: Forward,
    positions: Positions,
    method: str,
    double_quant: bool = True,
) -> None:
    """Fill in ``kl`` of each of ``layers``: the logits' KL when that layer alone is quantized."""
    reference = reference_log_probs(model, batches, forward, positions)
    for layer in layers:
        with simulated_quantization(model, [layer.name], method, double_quant):
            layer.kl = fidelity(model, batches, forward, positions, reference).kl
