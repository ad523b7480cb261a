"""Pieces several kernels share: rounding that agrees between GPU and interpreter, the tiling of row-wise
kernels (norms), the one-launch reduction of fp32 partial sums (norm weight grads, thin products), the launch
constants of rank-r ``tl.dot`` products (thin products, widened LoRA input), and the gated activations' launchers. Imports torch and triton only."""

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

# Triton decides the same way, when a kernel is decorated, whether it runs in its CPU interpreter.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to_nearest(value, DTYPE: tl.constexpr):
    """fp32 ``value`` rounded to nearest-even in ``DTYPE``, still held in fp32 (a later cast is exact).

    GPUs round on fp32 → bf16 casts (and the compiler folds the round trip into the final cast); Triton's
    CPU interpreter truncates, so there bf16 is rounded by hand, giving the GPU's bits.
    """
    if DTYPE == tl.bfloat16 and INTERPRETED:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.bfloat16 or DTYPE == tl.float16:
        return value.to(DTYPE).to(tl.float32)
    else:
        return value


# Row tiling of the norms; module constants so that a tuning sweep can set them. On an H100 (widths 1280 and
# 4096, 2048 and 8192 rows) 2048 elements and 16 warps per SM were best or within 5% of the best everywhere
# but LayerNorm at 2048 rows; 64 warps per SM was up to 1.7x slower there.
ROW_TILE_ELEMENTS = 2048  # elements a program loads per step: several rows when rows are narrow
BACKWARD_WARPS_PER_SM = 16  # resident warps of persistent backward programs per SM


@triton.jit
def row_block(first_row, n_rows, col_ok, ROWS: tl.constexpr):
    """The ROWS rows of a norm's [ROWS, BLOCK] tile from ``first_row``: their indices (int64, since row * stride
    can pass 2**31 at long sequences), which of them exist, and the tile's mask."""
    rows = first_row + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    return rows.to(tl.int64), row_ok, row_ok[:, None] & col_ok[None, :]


def row_tile(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): one row per program, several when rows are narrow so each program moves enough data."""
    block = triton.next_power_of_2(width)
    rows = max(1, min(16, ROW_TILE_ELEMENTS // block))
    elements = block * rows
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block, rows, num_warps


@lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(tensor: torch.Tensor) -> int:
    """SMs of the CUDA device that holds ``tensor``."""
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


def backward_programs(x: torch.Tensor, row_tiles: int, num_warps: int, sums_weight_grads: bool) -> int:
    """Programs of a norm's backward. When it sums weight grads: persistent programs, ``BACKWARD_WARPS_PER_SM``
    warps per SM, each summing its rows' grads in fp32, so only this many partial rows remain to reduce.
    Otherwise (frozen weights) one per row tile: nothing to sum, and the most loads in flight."""
    if not sums_weight_grads:
        return row_tiles
    if not x.is_cuda:
        return max(1, min(row_tiles, 4))
    per_sm = max(1, BACKWARD_WARPS_PER_SM // num_warps)
    return max(1, min(row_tiles, per_sm * multiprocessors(x)))


def rank_dot_constants(operand: torch.Tensor, rank: int) -> dict:
    """Launch constants of a kernel that multiplies tiles of ``operand`` by a rank-r matrix with ``tl.dot``:
    ``RANK``, the rank padded to a power of two of at least 16 (``tl.dot``'s narrowest; the pad loads as zeros),
    ``PRECISION`` (exact products for fp32) and ``DOT_IN_FP32`` (off the GPU: Triton's CPU interpreter gets bf16
    dots wrong, while fp32 products of the same values are exact)."""
    return dict(
        RANK=max(16, triton.next_power_of_2(rank)),
        PRECISION="ieee" if operand.dtype == torch.float32 or not operand.is_cuda else "tf32",
        DOT_IN_FP32=not operand.is_cuda,
    )


_PARTIAL_COLS = 64


def _partial_rows_and_warps(n_partials: int) -> tuple[int, int]:
    """Rows a program adds per step, and its warps. Swept on an H100 over 64-1024 columns, 1-32 rows and 4 or
    8 warps: many partial rows (norm weight grads: 264-1056 rows of 1280-4096) want 16 rows and 8 warps; few
    rows of many columns (thin products: 5-56 rows of 131072-229376) 4 rows and 4 warps, 1.2-2.7x faster there."""
    return (16, 8) if n_partials > 64 else (4, 4)


@triton.jit
def _column_sum(PARTIALS, OUT, n_partials, n_cols, scale, cols, BLOCK_ROWS: tl.constexpr):
    col_ok = cols < n_cols
    total = tl.zeros((BLOCK_ROWS, cols.shape[0]), dtype=tl.float32)
    for first in range(0, n_partials, BLOCK_ROWS):
        rows = first + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_partials)[:, None] & col_ok[None, :]
        total += tl.load(PARTIALS + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)
    column_sum = tl.sum(total, axis=0) * scale
    tl.store(OUT + cols, round_to_nearest(column_sum, OUT.dtype.element_ty).to(OUT.dtype.element_ty), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    PARTIALS0, OUT0, n_partials0, n_cols0, scale0, PARTIALS1, OUT1, n_partials1, n_cols1, scale1,
    BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    if tl.program_id(1) == 0:
        _column_sum(PARTIALS0, OUT0, n_partials0, n_cols0, scale0, cols, BLOCK_ROWS)
    else:
        _column_sum(PARTIALS1, OUT1, n_partials1, n_cols1, scale1, cols, BLOCK_ROWS)


def sum_partials(
    partials: list[torch.Tensor], dtypes: list[torch.dtype], scales: list[float] | None = None
) -> list[torch.Tensor]:
    """``(scale * p.sum(0)).to(dtype)`` for each (of one or two) fp32 partial-sum tensors ``p`` [rows, columns],
    summed in fp32 and rounded once, in one launch."""
    scales = scales or [1.0] * len(partials)
    if len(partials) not in (1, 2) or len(dtypes) != len(partials) or len(scales) != len(partials):
        raise ValueError(
            f"{len(partials)} groups of partials, {len(dtypes)} dtypes and {len(scales)} scales; "
            "one or two of each, as many of each, expected"
        )
    for p in partials:
        if p.dim() != 2 or p.dtype != torch.float32 or not p.is_contiguous():
            raise ValueError(f"partials must be contiguous 2-D fp32 tensors, got {p.dtype} {tuple(p.shape)}")
    sums = [torch.empty(p.shape[1], dtype=dtype, device=p.device) for p, dtype in zip(partials, dtypes)]
    args = [a for p, out, scale in zip(partials, sums, scales) for a in (p, out, p.shape[0], p.shape[1], float(scale))]
    if len(partials) == 1:
        args *= 2  # the second group's arguments are never read
    widest = max(p.shape[1] for p in partials)
    if widest > 0:
        grid = (triton.cdiv(widest, _PARTIAL_COLS), len(partials))
        rows, warps = _partial_rows_and_warps(max(p.shape[0] for p in partials))
        _sum_partials_kernel[grid](*args, BLOCK_COLS=_PARTIAL_COLS, BLOCK_ROWS=rows, num_warps=warps)
    return sums


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
