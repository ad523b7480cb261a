"""RMSNorm as in Hugging Face ``LlamaRMSNorm`` (Llama, Qwen2/3, Mllama text) and, as a variant, ``Gemma3RMSNorm``
(scale ``1 + weight``, all in fp32), fused into one Triton pass per row: forward reads each row once and keeps
only its fp32 rstd, backward recomputes the normalized row from it.

With ``x_hat = x * rstd``, ``rstd = 1 / sqrt(mean(x^2) + eps)`` and the scale ``s = offset + w``:
``y = s * x_hat``; ``dx = rstd * (g - x_hat * mean(g * x_hat))`` with ``g = dy * s``; ``dw = sum over rows of
dy * x_hat`` (the offset is a constant, so the weight's gradient is the same in both variants).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _row_tiling as tiles
from ._partial_sums import sum_partials
from ._rounding import round_to_nearest


@dataclass(frozen=True)
class RMSNormVariant:
    """What scales the normalized row and in which dtype.

    ``offset``: the scale is ``offset + weight`` (Gemma stores its weights around 0 and adds 1).
    ``scale_in_float32``: Gemma multiplies the fp32 normalized row by the fp32 scale and rounds once to x's
    dtype; otherwise (Llama) the normalized row is rounded to x's dtype first, and the product is in the
    dtype that x's and the weight's promote to.
    """

    offset: float = 0.0
    scale_in_float32: bool = False

    def out_dtype(self, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
        return x_dtype if self.scale_in_float32 else torch.promote_types(weight_dtype, x_dtype)


LLAMA = RMSNormVariant()
GEMMA = RMSNormVariant(offset=1.0, scale_in_float32=True)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: RMSNormVariant = LLAMA) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (``variant=LLAMA``): normalize in fp32 (or wider), cast to x's dtype, then scale
    by the weight; ``Gemma3RMSNorm.forward`` (``GEMMA``): normalize and scale by ``1 + weight`` in fp32 (or
    wider), then cast to x's dtype."""
    hidden = x.to(torch.promote_types(x.dtype, torch.float32))
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if variant.scale_in_float32:
        return (hidden * (variant.offset + weight.to(hidden.dtype))).to(x.dtype)
    scale = variant.offset + weight if variant.offset else weight
    return scale * hidden.to(x.dtype)


@triton.jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD, n_rows, n_cols, x_row_stride, y_row_stride, eps, offset,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, SCALE_IN_FLOAT32: tl.constexpr,
):
    cols, col_ok = tiles.row_columns(n_cols, BLOCK)
    rows, row_ok, mask = tiles.row_block(tl.program_id(0) * ROWS, n_rows, col_ok, ROWS)

    x = tiles.load_row_tile(X, rows, x_row_stride, cols, mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if not SCALE_IN_FLOAT32:
        # Llama rounds the normalized row to x's dtype before the weight multiplies it.
        normed = round_to_nearest(normed, X.dtype.element_ty)
    scale = offset + tiles.load_row_vector(W, cols, col_ok)
    tiles.store_row_tile(Y, rows, y_row_stride, cols, mask, scale[None, :] * normed)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride, offset,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_ok = tiles.row_columns(n_cols, BLOCK)
    w = offset + tiles.load_row_vector(W, cols, col_ok)
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for first_row in range(pid * ROWS, n_rows, tl.num_programs(0) * ROWS):
        rows, row_ok, mask, x, dy = tiles.backward_row_tile(
            X, DY, first_row, n_rows, x_row_stride, dy_row_stride, cols, col_ok, ROWS
        )
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        if COMPUTE_DW:
            dw += dy * x_hat
        g = dy * w[None, :]
        projection = tl.sum(g * x_hat, axis=1) / n_cols
        tiles.store_row_tile(DX, rows, dx_row_stride, cols, mask, rstd[:, None] * (g - x_hat * projection[:, None]))
    if COMPUTE_DW:
        tiles.store_column_partial(DW_PARTIAL, pid, n_cols, cols, col_ok, dw)


def _rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, variant: RMSNormVariant, tiling: tiles.RowTiling
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=variant.out_dtype(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid, launch = tiles.forward_launch(x, tiling)
    _rms_norm_forward_kernel[grid](
        x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps, variant.offset,
        SCALE_IN_FLOAT32=variant.scale_in_float32, **launch,
    )
    return y, rstd


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool, offset: float,
    tiling: tiles.RowTiling,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, n_cols = x.shape
    grid, launch = tiles.backward_launch(x, compute_dw, tiling)
    dx = torch.empty_like(x)
    # fp32 partial sums per program, reduced once below: exact-order, no bf16 atomics.
    dw_partial = torch.empty((grid[0], n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rms_norm_backward_kernel[grid](
        dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols, dy.stride(0), x.stride(0), dx.stride(0), offset,
        COMPUTE_DW=compute_dw, **launch,
    )
    dw = sum_partials([dw_partial], [weight.dtype])[0] if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, variant: RMSNormVariant, tiling: tiles.RowTiling
    ) -> torch.Tensor:
        x_rows = tiles.as_rows(x, x.shape[-1])
        y, rstd = _rms_norm_forward(x_rows, weight.contiguous(), eps, variant, tiling)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.x_shape, ctx.offset, ctx.tiling = x.shape, variant.offset, tiling
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(
            tiles.as_rows(dy, x_rows.shape[1]), x_rows, weight.contiguous(), rstd, ctx.needs_input_grad[1], ctx.offset,
            ctx.tiling,
        )
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    variant: RMSNormVariant = LLAMA,
    tiling: tiles.RowTiling = tiles.DEFAULT_ROW_TILING,
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), with the semantics of ``rms_norm_reference``
    for ``variant``; ``tiling`` chooses how rows are split over programs (not the result)."""
    return RMSNormFunction.apply(x, weight, eps, variant, tiling)
