"""``[x | scale * x @ A.T | 0]``: the input of a GEMM that also adds LoRA's product, ``[x | x_a] @ [W | B].T``.

A LoRA layer's output is ``x @ W.T + x_a @ B.T`` with ``x_a = scale * x @ A.T`` of rank r. Written this way
the big GEMM adds the low-rank term inside its own sum, and no pass writes (or rereads) a full-size LoRA
product. One Triton pass reads x once: it copies each tile into the wider buffer and, from the same tile,
accumulates ``x @ A.T`` on Tensor Cores. The columns past ``in + r`` are zeroed, so the buffer's row length
(the GEMM's leading dimension) can be padded to what cuBLAS runs fastest on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._rounding import round_to_nearest
from ._rank_dot import rank_dot_constants

# cuBLAS on an H100 at 8192 x 14336 x (4096 + 16): 1296 µs with rows of 4112 elements, 1239 µs with rows of
# 4160 (a multiple of 64), against 1195 µs for 4096 alone.
ROW_ALIGNMENT = 64
# Tile of the copy: the fastest of 64 on an H100 at 2048 and 8192 x 4096 (r 16): 22 and 54 µs, about 2.5 TB/s.
# Its width is in bytes, so that 4-byte inputs keep the 16-bit stages' shared memory.
_BLOCK_M = 64
_BLOCK_K_BYTES = 512
_WARPS = 4
_STAGES = 4


def widened_width(in_features: int, rank: int) -> int:
    """Row length of the widened buffer: ``in_features + rank`` rounded up to ``ROW_ALIGNMENT``."""
    return triton.cdiv(in_features + rank, ROW_ALIGNMENT) * ROW_ALIGNMENT


def widen_with_lora_reference(
    x: torch.Tensor, lora_A: torch.Tensor, scale: float, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[x | x_a | 0]`` [m, width], ``x_a = scale * x @ A.T`` [m, r]), x_a summed in fp32 and rounded once."""
    m, n = x.shape
    rank = lora_A.shape[0]
    x_a = (torch.mm(x.float(), lora_A.float().t()) * scale).to(x.dtype)
    wide = torch.zeros(m, width, dtype=x.dtype, device=x.device)
    wide[:, :n] = x
    wide[:, n:n + rank] = x_a
    return wide, x_a


@triton.jit
def _widen_with_lora_kernel(
    X, A, WIDE, X_A, n_rows, n_cols, rank, width, x_row_stride, a_row_stride, a_col_stride, scale,
    RANK: tl.constexpr, PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_rows
    ranks = tl.arange(0, RANK)  # a power of two >= 16 for tl.dot; A's missing ranks load as zeros
    rank_ok = ranks < rank
    x_a = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
    for first in range(0, n_cols, BLOCK_K):
        cols = first + tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        tile = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        tl.store(WIDE + rows[:, None] * width + cols[None, :], tile, mask=mask)
        a_t = tl.load(A + ranks[None, :] * a_row_stride + cols[:, None] * a_col_stride,
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            tile, a_t = tile.to(tl.float32), a_t.to(tl.float32)
        x_a += tl.dot(tile, a_t, input_precision=PRECISION)
    dtype = WIDE.dtype.element_ty
    x_a = round_to_nearest(x_a * scale, dtype).to(dtype)
    tl.store(X_A + rows[:, None] * rank + ranks[None, :], x_a, mask=row_ok[:, None] & rank_ok[None, :])
    tl.store(WIDE + rows[:, None] * width + n_cols + ranks[None, :], x_a, mask=row_ok[:, None] & rank_ok[None, :])
    pad = rank + tl.arange(0, PAD)
    tl.store(WIDE + rows[:, None] * width + n_cols + pad[None, :], tl.zeros((BLOCK_M, PAD), dtype=dtype),
             mask=row_ok[:, None] & (n_cols + pad < width)[None, :])


def widen_with_lora(
    x: torch.Tensor, lora_A: torch.Tensor, scale: float, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[x | x_a | 0]`` [m, width], ``x_a = scale * x @ A.T`` [m, r]) in x's dtype, x read once.

    ``x`` [m, n] has unit column stride, ``lora_A`` [r, n] (any strides) is in x's dtype, and
    ``width >= n + r``.
    """
    n_rows, n_cols = x.shape
    rank = lora_A.shape[0]
    if lora_A.shape[1] != n_cols or lora_A.dtype != x.dtype:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} {lora_A.dtype} does not fit x {tuple(x.shape)} {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x needs unit column stride")
    if width < n_cols + rank:
        raise ValueError(f"width {width} is less than {n_cols} features + rank {rank}")
    wide = torch.empty(n_rows, width, dtype=x.dtype, device=x.device)
    x_a = torch.empty(n_rows, rank, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return wide, x_a
    _widen_with_lora_kernel[(triton.cdiv(n_rows, _BLOCK_M),)](
        x, lora_A, wide, x_a, n_rows, n_cols, rank, width, x.stride(0), lora_A.stride(0), lora_A.stride(1),
        float(scale),
        **rank_dot_constants(x, rank), PAD=triton.next_power_of_2(max(1, width - n_cols - rank)),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K_BYTES // x.element_size(), num_warps=_WARPS, num_stages=_STAGES,
    )
    return wide, x_a
