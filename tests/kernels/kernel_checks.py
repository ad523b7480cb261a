"""Checks the kernel tests share: a module with a kernel swapped in against the stock module, the
tolerance of gradients summed over many rows, and closeness measured against a result's own scale."""

from __future__ import annotations

import copy
import math
import types

import torch


def summed_over_rows(tolerance: dict, n_rows: int) -> dict:
    """Parameter grads are sums over rows of random-signed terms: their typical size, and the fp32 rounding
    of the sum, grow like sqrt(rows), so the absolute floor does too (rtol stays the dtype's)."""
    return dict(atol=tolerance["atol"] * math.sqrt(n_rows), rtol=tolerance["rtol"])


def dtype_id(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``: readable test ids."""
    return str(dtype).removeprefix("torch.")


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict) -> None:
    """``actual`` against ``expected`` (a float64 reference or a peer's result), both divided by the expected
    result's RMS: matmul sums grow with their length, so ``tolerance`` is relative to the tensor's scale."""
    assert actual.shape == expected.shape
    scale = expected.double().pow(2).mean().sqrt().clamp(min=1e-30)
    torch.testing.assert_close(actual.double() / scale, expected.double() / scale, **tolerance)


def assert_forward_swap_matches(stock: torch.nn.Module, forward, x: torch.Tensor, tolerance: dict) -> None:  # noqa: ANN001
    """A copy of ``stock`` running ``forward`` gives the same output, input grad and parameter grads."""
    fused = copy.deepcopy(stock)
    fused.forward = types.MethodType(forward, fused)
    x_stock, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()

    expected, actual = stock(x_stock), fused(x_fused)
    expected.square().sum().backward()
    actual.square().sum().backward()

    torch.testing.assert_close(actual, expected, **tolerance)
    torch.testing.assert_close(x_fused.grad, x_stock.grad, **tolerance)
    for (name, fused_param), stock_param in zip(fused.named_parameters(), stock.parameters()):
        torch.testing.assert_close(fused_param.grad, stock_param.grad, **tolerance, msg=name)
