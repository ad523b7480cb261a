"""What the gated activations (SwiGLU, GeGLU) share: the elementwise tiling of the flattened tensors, the check
of their two inputs, and the launchers of their forward and backward kernels (the ops supply the kernels)."""

import torch
import triton
import triton.language as tl

# One program per block of elements of the flattened tensors, memory-bound: 1024 elements over 4 warps
# gives each thread one 16-byte load per operand in bf16/fp16; larger blocks and more warps measured
# the same on an H100.
GATED_BLOCK = 1024
GATED_WARPS = 4


@triton.jit
def block_offsets(n_elements, BLOCK: tl.constexpr):
    """The offsets of this program's block of the flattened tensors, and which of them exist."""
    # int64 so that tensors past 2**31 elements still index correctly.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n_elements


def check_gate_and_up(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must match in shape, dtype and device; got {tuple(gate.shape)} {gate.dtype} "
            f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}"
        )


def gated_forward(kernel, gate: torch.Tensor, up: torch.Tensor, **constants) -> torch.Tensor:  # noqa: ANN001
    """``kernel(gate, up, out, n, ...)`` over the flattened tensors; ``out`` in their dtype and shape."""
    check_gate_and_up(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if out.numel() > 0:
        grid = (triton.cdiv(out.numel(), GATED_BLOCK),)
        kernel[grid](gate, up, out, out.numel(), BLOCK=GATED_BLOCK, num_warps=GATED_WARPS, **constants)
    return out


def gated_backward(
    kernel, grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,  # noqa: ANN001
    needs_grad_gate: bool, needs_grad_up: bool, grads_into_inputs: bool = False, **constants,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``gate`` and ``up`` (None where not needed), from ``kernel``.

    With ``grads_into_inputs`` they overwrite ``gate`` and ``up``: each element is read before the same
    thread writes its gradient, and two full-size buffers are never allocated.
    """
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    if grads_into_inputs and gate.data_ptr() == up.data_ptr():
        raise ValueError("gate and up share memory: their gradients cannot both be written in place")
    # In place, the grads are new views of the inputs' memory: autograd may then hand them on (or make them
    # a leaf's .grad) without the copy it makes of a tensor that is also saved.
    fresh = not grads_into_inputs
    grad_gate = (torch.empty_like(gate) if fresh else gate.view_as(gate)) if needs_grad_gate else None
    grad_up = (torch.empty_like(up) if fresh else up.view_as(up)) if needs_grad_up else None
    n_elements = gate.numel()
    if n_elements > 0 and (needs_grad_gate or needs_grad_up):
        kernel[(triton.cdiv(n_elements, GATED_BLOCK),)](
            grad_out, gate, up,
            grad_gate if needs_grad_gate else gate,  # unused placeholder pointers when not needed
            grad_up if needs_grad_up else up,
            n_elements,
            NEEDS_GRAD_GATE=needs_grad_gate, NEEDS_GRAD_UP=needs_grad_up,
            BLOCK=GATED_BLOCK, num_warps=GATED_WARPS, **constants,
        )
    return grad_gate, grad_up
