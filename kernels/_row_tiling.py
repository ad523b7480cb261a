"""How the row-wise kernels (the norms) tile their rows: the ``RowTiling`` settings, the tile and grid they
give for a width, and the pieces of kernel code that address a [ROWS, BLOCK] tile of rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._device import multiprocessors
from ._rounding import round_to_nearest
from ._settings import require_at_least, require_power_of_two


@dataclass(frozen=True)
class RowTiling:
    """Row tiling of the norms. On an H100 (widths 1280 and 4096, 2048 and 8192 rows) the defaults were best or
    within 5% of the best everywhere but LayerNorm at 2048 rows; 64 warps per SM was up to 1.7x slower there."""

    # Elements a program loads per step: several rows when rows are narrow, so each program moves enough data.
    tile_elements: int = 2048
    # Resident warps of persistent backward programs per SM: enough loads in flight, few partial rows to sum.
    backward_warps_per_sm: int = 16

    def __post_init__(self) -> None:
        require_power_of_two(self, "tile_elements")  # the rows of a tile are tile_elements // a power of two
        require_at_least(self, 1, "backward_warps_per_sm")


DEFAULT_ROW_TILING = RowTiling()


def row_tile(width: int, tiling: RowTiling) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): one row per program, several when rows are narrow so each program moves enough data."""
    block = triton.next_power_of_2(width)
    rows = max(1, min(16, tiling.tile_elements // block))
    elements = block * rows
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block, rows, num_warps


def backward_programs(
    x: torch.Tensor, row_tiles: int, num_warps: int, sums_weight_grads: bool, tiling: RowTiling
) -> int:
    """Programs of a norm's backward. When it sums weight grads: persistent programs, ``backward_warps_per_sm``
    warps per SM, each summing its rows' grads in fp32, so only this many partial rows remain to reduce.
    Otherwise (frozen weights) one per row tile: nothing to sum, and the most loads in flight."""
    if not sums_weight_grads:
        return row_tiles
    if not x.is_cuda:
        return max(1, min(row_tiles, 4))
    per_sm = max(1, tiling.backward_warps_per_sm // num_warps)
    return max(1, min(row_tiles, per_sm * multiprocessors(x)))


def forward_launch(x: torch.Tensor, tiling: RowTiling) -> tuple[tuple[int], dict]:
    """Grid and launch constants (``BLOCK``, ``ROWS``, ``num_warps``) of a norm's forward over ``x`` [rows, width]:
    one program per tile of rows."""
    block, rows, num_warps = row_tile(x.shape[1], tiling)
    return (triton.cdiv(x.shape[0], rows),), dict(BLOCK=block, ROWS=rows, num_warps=num_warps)


def backward_launch(x: torch.Tensor, sums_weight_grads: bool, tiling: RowTiling) -> tuple[tuple[int], dict]:
    """Grid and launch constants of a norm's backward over ``x`` [rows, width] (see ``backward_programs``); the
    grid's size is also the number of rows of fp32 partial weight grads the programs leave."""
    block, rows, num_warps = row_tile(x.shape[1], tiling)
    programs = backward_programs(x, triton.cdiv(x.shape[0], rows), num_warps, sums_weight_grads, tiling)
    return (programs,), dict(BLOCK=block, ROWS=rows, num_warps=num_warps)


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as [rows, width] with unit column stride (a copy only when needed)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@triton.jit
def row_columns(n_cols, BLOCK: tl.constexpr):
    """The BLOCK columns of a row tile, and which of them exist."""
    cols = tl.arange(0, BLOCK)
    return cols, cols < n_cols


@triton.jit
def row_block(first_row, n_rows, col_ok, ROWS: tl.constexpr):
    """The ROWS rows of a norm's [ROWS, BLOCK] tile from ``first_row``: their indices (int64, since row * stride
    can pass 2**31 at long sequences), which of them exist, and the tile's mask."""
    rows = first_row + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    return rows.to(tl.int64), row_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def load_row_tile(PTR, rows, row_stride, cols, mask):
    """The [ROWS, BLOCK] tile of ``rows`` x ``cols`` in fp32, zeros where masked."""
    return tl.load(PTR + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_row_tile(PTR, rows, row_stride, cols, mask, value):
    """fp32 ``value`` rounded to nearest into ``PTR``'s dtype at ``rows`` x ``cols``."""
    dtype = PTR.dtype.element_ty
    tl.store(PTR + rows[:, None] * row_stride + cols[None, :], round_to_nearest(value, dtype).to(dtype), mask=mask)


@triton.jit
def backward_row_tile(X, DY, first_row, n_rows, x_row_stride, dy_row_stride, cols, col_ok, ROWS: tl.constexpr):
    """A norm backward's step: the rows from ``first_row`` (as ``row_block`` gives them) with their x and dy in fp32."""
    rows, row_ok, mask = row_block(first_row, n_rows, col_ok, ROWS)
    x = load_row_tile(X, rows, x_row_stride, cols, mask)
    dy = load_row_tile(DY, rows, dy_row_stride, cols, mask)
    return rows, row_ok, mask, x, dy


@triton.jit
def load_row_vector(PTR, cols, col_ok):
    """A per-column parameter (a norm's weight or bias) in fp32, zeros past the row."""
    return tl.load(PTR + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def store_column_partial(PARTIAL, program, n_cols, cols, col_ok, tile_sum):
    """This program's fp32 row of partial column sums (``tile_sum`` [ROWS, BLOCK] summed over its rows)."""
    tl.store(PARTIAL + program * n_cols + cols, tl.sum(tile_sum, axis=0), mask=col_ok)
