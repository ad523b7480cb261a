"""SwiGLU, ``silu(gate) * up``, the gated activation of Llama/Qwen2 MLPs, fused into one elementwise pass
each way so that neither ``silu(gate)`` nor its derivative is ever stored: backward recomputes them from
the saved ``gate`` and ``up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Elementwise and memory bound: 1024 elements over 4 warps gives each thread 8 contiguous elements,
# i.e. one 16-byte vector load per operand in bf16/fp16.
BLOCK_SIZE = 1024
NUM_WARPS = 4


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Hugging Face LlamaMLP / Qwen2MLP: ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU, in the tensor dtype."""
    return F.silu(gate) * up


@triton.jit
def _block_offsets(n_elements, BLOCK: tl.constexpr):
    # int64 so that tensors past 2**31 elements still index correctly.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n_elements


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets, mask = _block_offsets(n_elements, BLOCK)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n_elements,
    NEEDS_GRAD_GATE: tl.constexpr, NEEDS_GRAD_UP: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets, mask = _block_offsets(n_elements, BLOCK)
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


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, BLOCK_SIZE),)


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must match in shape, dtype and device; got {tuple(gate.shape)} {gate.dtype} "
            f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}"
        )


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32, returned in the input dtype and shape."""
    _check_inputs(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if out.numel() > 0:
        _swiglu_forward_kernel[_grid(out.numel())](gate, up, out, out.numel(), BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return out


def swiglu_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, needs_grad_gate: bool = True, needs_grad_up: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``gate`` and ``up`` (None where not needed), silu recomputed from ``gate``."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate = torch.empty_like(gate) if needs_grad_gate else None
    grad_up = torch.empty_like(up) if needs_grad_up else None
    n_elements = gate.numel()
    if n_elements > 0 and (needs_grad_gate or needs_grad_up):
        _swiglu_backward_kernel[_grid(n_elements)](
            grad_out, gate, up,
            grad_gate if needs_grad_gate else gate,  # unused placeholder pointers when not needed
            grad_up if needs_grad_up else up,
            n_elements,
            NEEDS_GRAD_GATE=needs_grad_gate, NEEDS_GRAD_UP=needs_grad_up,
            BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
        )
    return grad_gate, grad_up


class SwiGLUFunction(torch.autograd.Function):
    """Saves only ``gate`` and ``up``; the activation is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(grad_out, gate, up, *ctx.needs_input_grad[:2])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for tensors of any (matching) shape, differentiable in both inputs."""
    return SwiGLUFunction.apply(gate, up)
