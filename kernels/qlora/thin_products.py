"""The two products of a large matrix with thin ones, ``scale * big @ right`` and ``big.T @ left`` (``right``
[n, r], ``left`` [m, r], r a LoRA rank), either or both from one read of ``big`` [m, n].

LoRA's small products are memory-bound: each reads a [tokens, features] tensor to make or use a
[tokens, r] one. cuBLAS reads ``big`` once per product and reduces long sums slowly; here programs own a
column strip and a group of rows of ``big``, use Tensor Cores on each tile for both products, and leave
fp32 partial sums that one small launch adds up and rounds once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._device import multiprocessors
from .._partial_sums import sum_partials
from .._settings import require_at_least, require_power_of_two
from ._rank_dot import rank_dot_constants


def thin_products_reference(
    big: torch.Tensor, right: torch.Tensor | None, left: torch.Tensor | None, right_scale: float = 1.0
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(right_scale * big @ right, big.T @ left)``, None where that operand is None: one cuBLAS launch per
    product (``big`` read twice), each sum scaled in the epilogue and rounded once. Also what runs where
    launches cost more than bytes (ranks above the tiling's, and the QLoRA linear's host-bound inputs)."""
    return (
        None if right is None else torch.addmm(big.new_empty(()), big, right, beta=0, alpha=right_scale),
        None if left is None else torch.mm(big.t(), left),
    )


@dataclass(frozen=True)
class ThinTiling:
    """How ``thin_products`` splits ``big`` over programs, and up to which rank it is used at all. On an H100, for
    both products at 8192 tokens x 14336 features and r 16, the default tile was the fastest of 29 alone and of 4
    inside the QLoRA layer's backward, where dequantization runs beside it."""

    # Rows of ``big`` a program reads per step of its row group (a power of two, >= 16 for tl.dot).
    block_m: int = 32
    # Width of the column strip a program owns (a power of two, >= 16 for tl.dot).
    block_n: int = 512
    num_warps: int = 4
    # Programs per SM (off the GPU, as if it had 4): row groups are cut until the strips x groups reach it.
    programs_per_sm: int = 3
    num_stages: int = 3
    # The fp32 partial sums grow with the rank (strips x rows x r); past this they cost more than the read of
    # ``big`` they save, and cuBLAS is used instead.
    max_rank: int = 32

    def __post_init__(self) -> None:
        require_power_of_two(self, "block_m", "block_n", at_least=16)
        require_power_of_two(self, "num_warps")
        require_at_least(self, 1, "programs_per_sm", "num_stages")
        require_at_least(self, 0, "max_rank")


DEFAULT_THIN_TILING = ThinTiling()


@triton.jit
def _thin_products_kernel(
    BIG, RIGHT, LEFT, RIGHT_PARTIAL, LEFT_PARTIAL,
    n_rows, n_cols, rank, rows_per_group, big_row_stride, right_row_stride, right_rank_stride,
    RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, WITH_RIGHT: tl.constexpr, WITH_LEFT: tl.constexpr,
):
    strip = tl.program_id(0)
    group = tl.program_id(1)
    cols = strip * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    ranks = tl.arange(0, RANK)  # padded to a power of two >= 16 for tl.dot; the pad columns are zeros
    rank_ok = ranks < rank
    if WITH_RIGHT:
        right = tl.load(RIGHT + cols[:, None] * right_row_stride + ranks[None, :] * right_rank_stride,
                        mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            right = right.to(tl.float32)
    left_sum = tl.zeros((BLOCK_N, RANK), dtype=tl.float32)
    first_row = group * rows_per_group
    end_row = tl.minimum(first_row + rows_per_group, n_rows)
    for first in range(first_row, end_row, BLOCK_M):
        rows = (first + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < end_row
        tile = tl.load(BIG + rows[:, None] * big_row_stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            tile = tile.to(tl.float32)
        if WITH_RIGHT:
            # This strip's share of big @ right for these rows; the strips are summed later.
            part = tl.dot(tile, right, input_precision=PRECISION)
            tl.store(RIGHT_PARTIAL + (strip * n_rows + rows[:, None]) * rank + ranks[None, :], part,
                     mask=row_ok[:, None] & rank_ok[None, :])
        if WITH_LEFT:
            left = tl.load(LEFT + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                left = left.to(tl.float32)
            left_sum += tl.dot(tl.trans(tile), left, input_precision=PRECISION)
    if WITH_LEFT:
        # This group's share of big.T @ left for the strip; the groups are summed later.
        tl.store(LEFT_PARTIAL + (group * n_cols + cols[:, None]) * rank + ranks[None, :], left_sum,
                 mask=col_ok[:, None] & rank_ok[None, :])


def thin_products(
    big: torch.Tensor, right: torch.Tensor | None, left: torch.Tensor | None, right_scale: float = 1.0,
    tiling: ThinTiling = DEFAULT_THIN_TILING,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(right_scale * big @ right, big.T @ left)`` in ``big``'s dtype, None where that operand is None.

    ``big`` [m, n] and ``left`` [m, r] have unit column stride (``left`` contiguous); ``right`` [n, r] may be
    any strided view (such as ``A.t()``). Sums are fp32, each result rounded once. Ranks above
    ``tiling.max_rank`` use cuBLAS.
    """
    if right is None and left is None:
        raise ValueError("thin_products needs right, left or both")
    n_rows, n_cols = big.shape
    rank = (right if right is not None else left).shape[1]
    if big.stride(1) != 1 or (left is not None and not left.is_contiguous()):
        raise ValueError("big needs unit column stride and left must be contiguous")
    if rank > tiling.max_rank or n_rows == 0 or n_cols == 0:
        return thin_products_reference(big, right, left, right_scale)
    strips = triton.cdiv(n_cols, tiling.block_n)
    target = tiling.programs_per_sm * (multiprocessors(big) if big.is_cuda else 4)
    row_groups = max(1, min(triton.cdiv(target, strips), triton.cdiv(n_rows, tiling.block_m)))
    rows_per_group = triton.cdiv(triton.cdiv(n_rows, row_groups), tiling.block_m) * tiling.block_m
    row_groups = triton.cdiv(n_rows, rows_per_group)
    partial = dict(dtype=torch.float32, device=big.device)
    right_partial = torch.empty((strips, n_rows * rank), **partial) if right is not None else None
    left_partial = torch.empty((row_groups, n_cols * rank), **partial) if left is not None else None
    _thin_products_kernel[(strips, row_groups)](
        big, big if right is None else right, big if left is None else left,  # unused pointers: any tensor will do
        big if right is None else right_partial, big if left is None else left_partial,
        n_rows, n_cols, rank, rows_per_group, big.stride(0),
        0 if right is None else right.stride(0), 0 if right is None else right.stride(1),
        **rank_dot_constants(big, rank), BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
        WITH_RIGHT=right is not None, WITH_LEFT=left is not None,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )
    partials = [(p, s) for p, s in ((right_partial, right_scale), (left_partial, 1.0)) if p is not None]
    sums = iter(sum_partials([p for p, _ in partials], [big.dtype] * len(partials), scales=[s for _, s in partials]))
    return (
        next(sums).view(n_rows, rank) if right is not None else None,
        next(sums).view(n_cols, rank) if left is not None else None,
    )
