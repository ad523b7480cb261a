"""SwiGLU, ``silu(gate) * up``, the gated activation of Llama/Qwen2 MLPs, fused into one elementwise pass
each way so that neither ``silu(gate)`` nor its derivative is ever stored: backward recomputes them from
the saved ``gate`` and ``up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._gated import block_offsets, gated_backward, gated_forward


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Hugging Face LlamaMLP / Qwen2MLP: ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU, in the tensor dtype."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets, mask = block_offsets(n_elements, BLOCK)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n_elements,
    NEEDS_GRAD_GATE: tl.constexpr, NEEDS_GRAD_UP: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets, mask = block_offsets(n_elements, BLOCK)
    grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    if NEEDS_GRAD_GATE:
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    if NEEDS_GRAD_UP:
        grad_up = grad_out * gate * sig
        tl.store(grad_up_ptr + offsets, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32, returned in the input dtype and shape."""
    return gated_forward(_swiglu_forward_kernel, gate, up)


def swiglu_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, needs_grad_gate: bool = True,
    needs_grad_up: bool = True, grads_into_inputs: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``gate`` and ``up`` (None where not needed), silu recomputed from ``gate``;
    written over ``gate`` and ``up`` with ``grads_into_inputs``."""
    return gated_backward(
        _swiglu_backward_kernel, grad_out, gate, up, needs_grad_gate, needs_grad_up, grads_into_inputs
    )


class SwiGLUFunction(torch.autograd.Function):
    """Saves only ``gate`` and ``up``; the activation is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, grads_into_inputs: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.grads_into_inputs = grads_into_inputs
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = swiglu_backward(grad_out, gate, up, *ctx.needs_input_grad[:2], ctx.grads_into_inputs)
        return grad_gate, grad_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, grads_into_inputs: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for tensors of any (matching) shape, differentiable in both inputs.

    ``grads_into_inputs=True`` writes the backward's gradients over ``gate`` and ``up``, saving two
    buffers of their size; only for inputs nothing else reads after this op (an MLP's projections).
    """
    return SwiGLUFunction.apply(gate, up, grads_into_inputs)
