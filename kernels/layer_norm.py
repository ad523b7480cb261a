"""LayerNorm over the last dimension (``torch.nn.functional.layer_norm``, as in CLIP, Mllama ViT and Qwen2-VL
vision towers), fused into one Triton pass per row: forward keeps only fp32 mean and rstd per row, backward
recomputes the normalized row from them and sums weight and bias grads in fp32 per program."""

import torch
import triton
import triton.language as tl

from . import _row_tiling as tiles
from ._partial_sums import sum_partials


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch.nn.LayerNorm`` over the last dimension: output in x's dtype."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _layer_norm_forward_kernel(
    X, W, B, Y, MEAN, RSTD, n_rows, n_cols, x_row_stride, y_row_stride, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    cols, col_ok = tiles.row_columns(n_cols, BLOCK)
    rows, row_ok, mask = tiles.row_block(tl.program_id(0) * ROWS, n_rows, col_ok, ROWS)

    x = tiles.load_row_tile(X, rows, x_row_stride, cols, mask)
    mean = tl.sum(x, axis=1) / n_cols
    # Two-pass variance (the row is in registers): no cancellation for rows with a large mean.
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    w = tiles.load_row_vector(W, cols, col_ok)
    b = tiles.load_row_vector(B, cols, col_ok)
    tiles.store_row_tile(Y, rows, y_row_stride, cols, mask, centered * rstd[:, None] * w[None, :] + b[None, :])
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_backward_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COMPUTE_DW_DB: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_ok = tiles.row_columns(n_cols, BLOCK)
    w = tiles.load_row_vector(W, cols, col_ok)
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    db = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for first_row in range(pid * ROWS, n_rows, tl.num_programs(0) * ROWS):
        rows, row_ok, mask, x, dy = tiles.backward_row_tile(
            X, DY, first_row, n_rows, x_row_stride, dy_row_stride, cols, col_ok, ROWS
        )
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if COMPUTE_DW_DB:
            dw += dy * x_hat
            db += dy
        g = dy * w[None, :]
        g_mean = tl.sum(g, axis=1) / n_cols
        projection = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - g_mean[:, None] - x_hat * projection[:, None])
        tiles.store_row_tile(DX, rows, dx_row_stride, cols, mask, dx)
    if COMPUTE_DW_DB:
        tiles.store_column_partial(DW_PARTIAL, pid, n_cols, cols, col_ok, dw)
        tiles.store_column_partial(DB_PARTIAL, pid, n_cols, cols, col_ok, db)


def _layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, tiling: tiles.RowTiling
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid, launch = tiles.forward_launch(x, tiling)
    _layer_norm_forward_kernel[grid](
        x, weight, bias, y, mean, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps, **launch
    )
    return y, mean, rstd


def _layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias_dtype: torch.dtype,
    mean: torch.Tensor, rstd: torch.Tensor, compute_dw_db: bool, tiling: tiles.RowTiling,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n_rows, n_cols = x.shape
    grid, launch = tiles.backward_launch(x, compute_dw_db, tiling)
    dx = torch.empty_like(x)
    # fp32 partial sums per program, reduced once below: no bf16 atomics.
    partials = torch.empty((2, grid[0], n_cols), dtype=torch.float32, device=x.device) if compute_dw_db else None
    dw_partial, db_partial = (partials[0], partials[1]) if compute_dw_db else (rstd, rstd)
    _layer_norm_backward_kernel[grid](
        dy, x, weight, mean, rstd, dx, dw_partial, db_partial, n_rows, n_cols,
        dy.stride(0), x.stride(0), dx.stride(0),
        COMPUTE_DW_DB=compute_dw_db, **launch,
    )
    if not compute_dw_db:
        return dx, None, None
    dw, db = sum_partials([dw_partial, db_partial], [weight.dtype, bias_dtype])
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, tiling: tiles.RowTiling
    ) -> torch.Tensor:
        x_rows = tiles.as_rows(x, x.shape[-1])
        y, mean, rstd = _layer_norm_forward(x_rows, weight.contiguous(), bias.contiguous(), eps, tiling)
        ctx.save_for_backward(x_rows, weight, mean, rstd)
        ctx.x_shape, ctx.bias_dtype, ctx.tiling = x.shape, bias.dtype, tiling
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        compute_dw_db = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dw, db = _layer_norm_backward(
            tiles.as_rows(dy, x_rows.shape[1]), x_rows, weight.contiguous(), ctx.bias_dtype, mean, rstd, compute_dw_db,
            ctx.tiling,
        )
        return dx.view(ctx.x_shape), dw, db, None, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *, tiling: tiles.RowTiling = tiles.DEFAULT_ROW_TILING
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (any leading shape), with the semantics of ``layer_norm_reference``;
    ``tiling`` chooses how rows are split over programs (not the result)."""
    return LayerNormFunction.apply(x, weight, bias, eps, tiling)
