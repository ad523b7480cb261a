"""RMSNorm as in Hugging Face ``LlamaRMSNorm`` (Llama, Qwen2, Mllama text), fused into one Triton pass per
row: forward reads each row once and keeps only its fp32 rstd, backward recomputes the normalized row from it."""

import torch
import triton
import triton.language as tl

from . import _row_tiling as tiles
from ._partial_sums import sum_partials
from ._rounding import round_to_nearest


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: normalize in fp32 (or wider), cast to x's dtype, then scale by the weight."""
    hidden = x.to(torch.promote_types(x.dtype, torch.float32))
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


@triton.jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD, n_rows, n_cols, x_row_stride, y_row_stride, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    cols, col_ok = tiles.row_columns(n_cols, BLOCK)
    rows, row_ok, mask = tiles.row_block(tl.program_id(0) * ROWS, n_rows, col_ok, ROWS)

    x = tiles.load_row_tile(X, rows, x_row_stride, cols, mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # HF rounds the normalized row to x's dtype before the weight multiplies it.
    normed = round_to_nearest(x * rstd[:, None], X.dtype.element_ty)
    w = tiles.load_row_vector(W, cols, col_ok)
    tiles.store_row_tile(Y, rows, y_row_stride, cols, mask, w[None, :] * normed)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_ok = tiles.row_columns(n_cols, BLOCK)
    w = tiles.load_row_vector(W, cols, col_ok)
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
    x: torch.Tensor, weight: torch.Tensor, eps: float, tiling: tiles.RowTiling
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid, launch = tiles.forward_launch(x, tiling)
    _rms_norm_forward_kernel[grid](x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps, **launch)
    return y, rstd


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool, tiling: tiles.RowTiling
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, n_cols = x.shape
    grid, launch = tiles.backward_launch(x, compute_dw, tiling)
    dx = torch.empty_like(x)
    # fp32 partial sums per program, reduced once below: exact-order, no bf16 atomics.
    dw_partial = torch.empty((grid[0], n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rms_norm_backward_kernel[grid](
        dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols, dy.stride(0), x.stride(0), dx.stride(0),
        COMPUTE_DW=compute_dw, **launch,
    )
    dw = sum_partials([dw_partial], [weight.dtype])[0] if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, tiling: tiles.RowTiling) -> torch.Tensor:
        x_rows = tiles.as_rows(x, x.shape[-1])
        y, rstd = _rms_norm_forward(x_rows, weight.contiguous(), eps, tiling)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.x_shape, ctx.tiling = x.shape, tiling
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(
            tiles.as_rows(dy, x_rows.shape[1]), x_rows, weight.contiguous(), rstd, ctx.needs_input_grad[1], ctx.tiling
        )
        return dx.view(ctx.x_shape), dw, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, tiling: tiles.RowTiling = tiles.DEFAULT_ROW_TILING
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), with the semantics of ``rms_norm_reference``;
    ``tiling`` chooses how rows are split over programs (not the result)."""
    return RMSNormFunction.apply(x, weight, eps, tiling)
