"""GeGLU, ``gelu(gate) * up`` with the tanh (Gemma's gelu_pytorch_tanh) or exact erf GELU, fused into one
elementwise pass each way so that neither ``gelu(gate)`` nor its derivative is ever stored: backward
recomputes them from the saved ``gate`` and ``up``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._gated import block_offsets, gated_backward, gated_forward

APPROXIMATIONS = ("tanh", "none")

# constexpr: compiled Triton may only read globals so annotated.
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
TANH_CUBIC = tl.constexpr(0.044715)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Hugging Face GemmaMLP: ``act_fn(gate_proj(x)) * up_proj(x)`` with GELU (``gelu_pytorch_tanh`` for
    ``approximate="tanh"``, ``gelu`` for ``"none"``), in the tensor dtype."""
    return F.gelu(gate, approximate=approximate) * up


@triton.jit
def _gelu_and_derivative(z, APPROXIMATE_TANH: tl.constexpr):
    """GELU of fp32 ``z`` and its exact derivative for the chosen variant."""
    if APPROXIMATE_TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh needed, and no cancellation for negative z.
        inner = SQRT_2_OVER_PI * (z + TANH_CUBIC * z * z * z)
        s = tl.sigmoid(2.0 * inner)
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * z * z)
        gelu = z * s
        derivative = s + (z * s * (1.0 - s)) * (2.0 * d_inner)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT_2))
        gelu = z * cdf
        derivative = cdf + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return gelu, derivative


@triton.jit
def _geglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_elements, APPROXIMATE_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets, mask = block_offsets(n_elements, BLOCK)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # The derivative is dead code here and is eliminated by the compiler.
    gelu, _ = _gelu_and_derivative(gate, APPROXIMATE_TANH)
    tl.store(out_ptr + offsets, (gelu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n_elements,
    APPROXIMATE_TANH: tl.constexpr, NEEDS_GRAD_GATE: tl.constexpr, NEEDS_GRAD_UP: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets, mask = block_offsets(n_elements, BLOCK)
    grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gelu, derivative = _gelu_and_derivative(gate, APPROXIMATE_TANH)
    if NEEDS_GRAD_GATE:
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_gate = grad_out * up * derivative
        tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    if NEEDS_GRAD_UP:
        tl.store(grad_up_ptr + offsets, (grad_out * gelu).to(grad_up_ptr.dtype.element_ty), mask=mask)


def _check_approximation(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up`` computed in fp32, returned in the input dtype and shape."""
    _check_approximation(approximate)
    return gated_forward(_geglu_forward_kernel, gate, up, APPROXIMATE_TANH=approximate == "tanh")


def geglu_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh",
    needs_grad_gate: bool = True, needs_grad_up: bool = True, grads_into_inputs: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``gate`` and ``up`` (None where not needed), gelu recomputed from ``gate``;
    written over ``gate`` and ``up`` with ``grads_into_inputs``."""
    return gated_backward(
        _geglu_backward_kernel, grad_out, gate, up, needs_grad_gate, needs_grad_up, grads_into_inputs,
        APPROXIMATE_TANH=approximate == "tanh",
    )


class GeGLUFunction(torch.autograd.Function):
    """Saves only ``gate`` and ``up``; the activation is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str, grads_into_inputs: bool) -> torch.Tensor:
        out = geglu_forward(gate, up, approximate)
        ctx.save_for_backward(gate, up)
        ctx.approximate, ctx.grads_into_inputs = approximate, grads_into_inputs
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = geglu_backward(
            grad_out, gate, up, ctx.approximate, *ctx.needs_input_grad[:2], ctx.grads_into_inputs
        )
        return grad_gate, grad_up, None, None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *, grads_into_inputs: bool = False) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` for tensors of any (matching) shape, differentiable in both inputs.

    ``grads_into_inputs=True`` writes the backward's gradients over ``gate`` and ``up`` (see ``swiglu``).
    """
    return GeGLUFunction.apply(gate, up, approximate, grads_into_inputs)
