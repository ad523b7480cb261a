"""RMSNorm as in Hugging Face ``LlamaRMSNorm`` (Llama, Qwen2, Mllama text), fused into one Triton pass per
row: forward reads each row once and keeps only its fp32 rstd, backward recomputes the normalized row from it."""

import torch
import triton
import triton.language as tl

from ._shared import as_rows, backward_programs, round_to_nearest, row_block, row_tile, sum_partials


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
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    rows, row_ok, mask = row_block(tl.program_id(0) * ROWS, n_rows, col_ok, ROWS)

    x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    # HF rounds the normalized row to x's dtype before the weight multiplies it.
    normed = round_to_nearest(xf * rstd[:, None], x.dtype)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = w[None, :] * normed
    tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], round_to_nearest(y, Y.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for first_row in range(pid * ROWS, n_rows, n_programs * ROWS):
        rows, row_ok, mask = row_block(first_row, n_rows, col_ok, ROWS)
        x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        if COMPUTE_DW:
            dw += dy * x_hat
        g = dy * w[None, :]
        projection = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - x_hat * projection[:, None])
        tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], round_to_nearest(dx, DX.dtype.element_ty).to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, rows, num_warps = row_tile(n_cols)
    grid = (triton.cdiv(n_rows, rows),)
    _rms_norm_forward_kernel[grid](
        x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps,
        BLOCK=block, ROWS=rows, num_warps=num_warps,
    )
    return y, rstd


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, n_cols = x.shape
    block, rows, num_warps = row_tile(n_cols)
    programs = backward_programs(x, triton.cdiv(n_rows, rows), num_warps, compute_dw)
    dx = torch.empty_like(x)
    # fp32 partial sums per program, reduced once below: exact-order, no bf16 atomics.
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rms_norm_backward_kernel[(programs,)](
        dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols, dy.stride(0), x.stride(0), dx.stride(0),
        BLOCK=block, ROWS=rows, COMPUTE_DW=compute_dw, num_warps=num_warps,
    )
    dw = sum_partials([dw_partial], [weight.dtype])[0] if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        x_rows = as_rows(x, width)
        y, rstd = _rms_norm_forward(x_rows, weight.contiguous(), eps)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(
            as_rows(dy, x_rows.shape[1]), x_rows, weight.contiguous(), rstd, ctx.needs_input_grad[1]
        )
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), with the semantics of ``rms_norm_reference``."""
    return RMSNormFunction.apply(x, weight, eps)
