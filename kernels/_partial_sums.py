"""The one-launch reduction of fp32 partial sums [rows, columns] into rows of their own dtypes: what the norms'
weight grads and the thin products leave per program, added in fp32 and rounded once."""

import torch
import triton
import triton.language as tl

from ._rounding import round_to_nearest

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
