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
