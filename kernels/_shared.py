"""Pieces several kernels share: rounding that agrees between GPU and interpreter, and the tiling
of row-wise kernels (norms). Imports torch and triton only."""

from functools import lru_cache

import torch
import triton
import triton.language as tl


@triton.jit
def round_to_nearest(value, DTYPE: tl.constexpr):
    """fp32 ``value`` rounded to nearest-even in ``DTYPE``, still held in fp32 (a later cast is exact).

    GPUs round on fp32 → bf16 casts; Triton's CPU interpreter truncates. Rounding bf16 by hand
    (a few integer ops in memory-bound kernels) makes both give the same bits.
    """
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return value.to(tl.float16).to(tl.float32)
    else:
        return value


def row_tile(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): one row per program, several when rows are narrow so each program moves enough data."""
    block = triton.next_power_of_2(width)
    rows = max(1, min(16, 2048 // block))
    elements = block * rows
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block, rows, num_warps


@lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(x: torch.Tensor, row_tiles: int, num_warps: int) -> int:
    """Persistent programs, about 32 warps per SM (measured best on an H100 at 8192x4096 and 6404x1280); each sums
    its rows' parameter grads in fp32, so only this many partial rows remain to reduce."""
    if not x.is_cuda:
        return max(1, min(row_tiles, 4))
    device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return max(1, min(row_tiles, max(1, 32 // num_warps) * _multiprocessors(device_index)))


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as [rows, width] with unit column stride (a copy only when needed)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# --------------------------------------------------------------------------- gated activations
# One program per block of elements of the flattened tensors, memory-bound: 1024 elements over 4 warps
# gives each thread one 16-byte load per operand in bf16/fp16; larger blocks and more warps measured
# the same on an H100.
GATED_BLOCK = 1024
GATED_WARPS = 4


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
    needs_grad_gate: bool, needs_grad_up: bool, **constants,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``gate`` and ``up`` (None where not needed), from ``kernel``."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate = torch.empty_like(gate) if needs_grad_gate else None
    grad_up = torch.empty_like(up) if needs_grad_up else None
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
