"""Patches that replace a module's ``forward`` with one calling a kernel: norms, gated MLPs and
the QLoRA linear. Each checks that the module computes what the kernel computes, else leaves it."""

from __future__ import annotations

import functools
from copy import deepcopy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .report import PatchReport

if TYPE_CHECKING:
    from vlm.kernels.rms_norm import RMSNormVariant


# --------------------------------------------------------------------------- norms
def patch_rms_norms(model: nn.Module, report: PatchReport) -> None:
    """RMSNorms with a ``weight`` and ``variance_epsilon`` (or ``eps``): Llama's (``weight * x_hat``) and
    Gemma's (``(1 + weight) * x_hat`` in fp32), told apart by what the module computes (:func:`rms_norm_variant`)."""
    from vlm.kernels.rms_norm import rms_norm

    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or eps is None:
            report.skipped["rms_norm: no weight or eps"] += 1
            continue
        variant = rms_norm_variant(module, eps)
        if variant is None:
            report.skipped["rms_norm: computes neither Llama's nor Gemma's norm"] += 1
            continue

        def forward(self, hidden_states, eps=eps, variant=variant):  # noqa: ANN001
            return rms_norm(hidden_states, self.weight, eps, variant=variant)

        report.replace_forward(module, forward)
        report.patched["rms_norm"] += 1


def rms_norm_variant(module: nn.Module, eps: float) -> RMSNormVariant | None:
    """The kernel variant (``LLAMA`` or ``GEMMA``) whose formula and output dtype ``module`` has, or ``None``.

    Asked of an fp32 copy of the module (the module itself is neither run nor touched), since both kinds keep
    the same attributes: on a probe row in fp32 the two formulas differ by the whole normalized row (the
    offset of 1), far beyond rounding; given a bf16 row, Llama's answers in fp32 (its weight's dtype) and
    Gemma's in bf16.
    """
    from vlm.kernels.rms_norm import GEMMA, LLAMA, rms_norm_reference

    copy = deepcopy(module).float()
    weight = copy.weight.detach()
    probe = torch.randn(2, weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        out, half = copy(probe), copy(probe.to(torch.bfloat16))
    for variant in (LLAMA, GEMMA):
        expected = rms_norm_reference(probe, weight, eps, variant)
        same = out.shape == expected.shape and torch.allclose(out.float(), expected, rtol=1e-4, atol=1e-4)
        if same and half.dtype == variant.out_dtype(torch.bfloat16, torch.float32):
            return variant
    return None


def patch_layer_norms(model: nn.Module, report: PatchReport) -> None:
    from vlm.kernels.layer_norm import layer_norm

    for module in model.modules():
        if not isinstance(module, nn.LayerNorm):
            continue
        if not module.elementwise_affine or module.bias is None or len(module.normalized_shape) != 1:
            report.skipped["layer_norm: not affine over the last dimension"] += 1
            continue

        def forward(self, hidden_states):  # noqa: ANN001
            return layer_norm(hidden_states, self.weight, self.bias, self.eps)

        report.replace_forward(module, forward)
        report.patched["layer_norm"] += 1


# --------------------------------------------------------------------------- gated MLPs
def _activation_kind(act: nn.Module) -> str | None:
    """``swiglu``, ``geglu-tanh``, ``geglu-none`` or ``None`` for the MLP's activation module."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "swiglu"
    if isinstance(act, nn.GELU):
        return f"geglu-{act.approximate}"
    name = type(act).__name__
    if name in ("PytorchGELUTanh", "GELUTanh", "NewGELUActivation", "FastGELUActivation"):
        return "geglu-tanh"
    if name == "GELUActivation":
        return "geglu-none"
    return None


def _outputs_are_private(*modules: nn.Module) -> bool:
    """True when no forward hook could keep a module's output (a hook may store it for later)."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks:
        return False
    return not any(m._forward_hooks for m in modules)


@functools.cache
def _functions_that_keep_no_output() -> tuple[type, ...]:
    """Custom autograd Functions known to save none of their outputs for backward (they save inputs only)."""
    from vlm.kernels.qlora_linear import QLoRALinearFunction
    from vlm.quant.bnb_layers import four_bit_matmul_function

    return (QLoRALinearFunction, four_bit_matmul_function())


def _overwritable(tensor: torch.Tensor) -> bool:
    """True when the autograd graph keeps no reference to ``tensor``'s memory for a backward of its own: a
    non-leaf whose producing op (behind any view) does not save its result, as tanh or sigmoid would.

    Decided from the node's type alone: reading its saved tensors would run the unpack hooks of
    activation checkpointing (a recomputation) in the middle of the forward.
    """
    base = tensor._base if tensor._is_view() else tensor
    node = base.grad_fn
    if node is None:  # a leaf: its memory is the parameter or input itself
        return False
    if isinstance(node, torch.autograd.function.BackwardCFunction):  # a custom Function: only known ones
        return issubclass(node._forward_cls, _functions_that_keep_no_output())
    return not hasattr(type(node), "_saved_result")


def patch_gated_mlps(model: nn.Module, report: PatchReport, *, swiglu: bool, geglu: bool) -> None:
    """MLPs computing ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Qwen2, Mllama text, Qwen2.5-VL vision).

    ``gate_proj(x)`` and ``up_proj(x)`` are read by nothing but the activation, so its backward writes
    their gradients over them instead of allocating two more tensors of that size; unless a forward hook
    could have kept them, or the op that made them keeps them for its own backward.
    """
    for module in model.modules():
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        kind = _activation_kind(module.act_fn)
        if kind is None:
            report.skipped[f"gated mlp: activation {type(module.act_fn).__name__}"] += 1
            continue
        if kind == "swiglu" and swiglu:
            from vlm.kernels.swiglu import swiglu as gated
        elif kind.startswith("geglu") and geglu:
            from vlm.kernels.geglu import geglu as gated
        else:
            continue
        approximate = kind.split("-", 1)[1] if kind.startswith("geglu") else None

        def forward(self, x, gated=gated, approximate=approximate):  # noqa: ANN001
            gate, up = self.gate_proj(x), self.up_proj(x)
            private = _outputs_are_private(self.gate_proj, self.up_proj) and _overwritable(gate) and _overwritable(up)
            if approximate is None:
                return self.down_proj(gated(gate, up, grads_into_inputs=private))
            return self.down_proj(gated(gate, up, approximate, grads_into_inputs=private))

        report.replace_forward(module, forward)
        report.patched[kind.split("-")[0]] += 1


# --------------------------------------------------------------------------- QLoRA linear
def patch_qlora_linears(model: nn.Module, report: PatchReport) -> None:
    """PEFT LoRA layers on bitsandbytes 4-bit linears: one fused op for base and adapter.

    Falls back to PEFT's own forward (per call) where the fused op does not apply: adapters
    disabled or merged, several active adapters, LoRA dropout, or a variant such as DoRA.
    """
    import bitsandbytes as bnb

    from vlm.kernels.qlora_linear import qlora_linear
    from vlm.quant.bnb_layers import plain_adapter, runs_plain_adapter

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit) or not hasattr(module, "lora_A"):
            continue
        adapter = plain_adapter(module)
        if adapter is None:
            report.skipped["lora: dropout, several adapters or a variant"] += 1
            continue
        peft_forward = module.forward

        def forward(self, x, *args, peft_forward=peft_forward, adapter=adapter, **kwargs):  # noqa: ANN001
            if not runs_plain_adapter(self, adapter, args, kwargs):
                return peft_forward(x, *args, **kwargs)
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            weight = self.base_layer.weight
            # As bitsandbytes does: compute in the layer's compute dtype, answer in the input's.
            compute = self.base_layer.compute_dtype or x.dtype
            bias = self.base_layer.bias
            out = qlora_linear(  # it casts a and b to the compute dtype itself, outside autograd's graph
                x.to(compute), weight, weight.quant_state, a, b,
                self.scaling[adapter], None if bias is None else bias.to(compute),
            )
            return out.to(x.dtype)

        report.replace_forward(module, forward)
        report.patched["lora"] += 1
