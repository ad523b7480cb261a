"""Checks the kernel tests share: a module with a kernel swapped in against the stock module, the
tolerance of gradients summed over many rows, closeness measured against a result's own scale, bit
identity, and the float64 comparisons the norms and the gated activations each make the same way."""

from __future__ import annotations

import copy
import math
import types

import pytest
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


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and every bit (NaNs and signed zeros included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    as_ints = torch.int32 if expected.element_size() == 4 else torch.int16
    mismatches = (actual.view(as_ints) != expected.view(as_ints)).sum().item()
    assert mismatches == 0, f"{mismatches} of {expected.numel()} values differ"


def quantized_nf4_weight(out_features, in_features, dtype, double_quant, generator, device):  # noqa: ANN001, ANN201
    """(packed codes, QuantState) of a random [out, in] weight of unit output scale, as bitsandbytes quantizes it
    (blocks of 64, double-quantized scales with ``double_quant``)."""
    from bitsandbytes import functional as bnb_functional

    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    return bnb_functional.quantize_4bit(
        weight.to(device=device, dtype=dtype), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )


# --------------------------------------------------------------------------- norms
def _norm_cases() -> list:
    from vlm.kernels._row_tiling import DEFAULT_ROW_TILING, RowTiling

    grid = [
        pytest.param((rows,), width, DEFAULT_ROW_TILING, id=f"{rows}x{width}")
        for rows in (1, 7, 33) for width in (64, 100, 1000)
    ]
    other_tilings = [
        pytest.param((33,), 100, RowTiling(tile_elements=64), id="33x100_one_row_per_program"),
        pytest.param((33,), 100, RowTiling(tile_elements=4096), id="33x100_sixteen_rows_per_program"),
    ]
    return grid + [pytest.param((2, 3), 100, DEFAULT_ROW_TILING, id="2x3x100_leading_shape")] + other_tilings


# Against a float64 reference a norm's output and grads are rounded to nearest once, half an epsilon (RMSNorm's
# output twice: HF rounds the normalized row to x's dtype before the weight multiplies it): rtol is a little over
# one epsilon of the dtype, atol a floor near zero; fp32 also leaves room for fp32 sums over a row and, for the
# parameter grads, over all rows (``summed_over_rows``).
NORM_TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1.25e-3),
}
# (leading shape, width, row tiling) a norm is checked over: one row and odd row counts; widths of a power of two,
# of none and of several warps' loads; a leading shape of two dimensions (normalized over the last); and the
# default tiling's 16 rows of 128 against one row, and against 16 rows of a larger tile.
NORM_CASES = _norm_cases()


def norm_inputs(shape, width: int, dtype, param_dtype, device, *, x_mean: float = 0.0, x_scale: float = 1.0,
                with_bias: bool = False, seed: int = 0):  # noqa: ANN001, ANN201
    """(x [*shape, width] of the given mean and scale, [weight around 1, bias around 0 when ``with_bias``], the
    generator that drew them, for the output grad to come)."""
    generator = torch.Generator().manual_seed(seed)
    x = x_mean + x_scale * torch.randn(*shape, width, generator=generator)
    params = [1.0 + 0.5 * torch.randn(width, generator=generator)]
    if with_bias:
        params.append(0.5 * torch.randn(width, generator=generator))
    return x.to(device=device, dtype=dtype), [p.to(device=device, dtype=param_dtype) for p in params], generator


def assert_norm_matches_float64(
    op, reference, x, params, generator, tolerance: dict, out_dtype  # noqa: ANN001
) -> None:
    """``op(x, *params)`` against ``reference`` on float64 copies of the same leaves, forward and backward for a
    random output grad drawn from ``generator``: the output (in ``out_dtype``), x's grad, and the grads of the
    params that require one, these summed over rows (``summed_over_rows``), each in its tensor's dtype."""
    leaves = [x.requires_grad_(True), *params]
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    out = op(*leaves)
    expected = reference(*leaves64)
    grad_out = torch.randn(out.shape, generator=generator).to(device=x.device, dtype=out.dtype)
    out.backward(grad_out)
    expected.backward(grad_out.double())

    assert out.dtype == out_dtype
    torch.testing.assert_close(out.double(), expected, **tolerance)
    assert x.grad.dtype == x.dtype
    torch.testing.assert_close(x.grad.double(), leaves64[0].grad, **tolerance)
    summed = summed_over_rows(tolerance, x.numel() // x.shape[-1])
    for param, param64 in zip(leaves[1:], leaves64[1:]):
        if param.requires_grad:
            assert param.grad.dtype == param.dtype
            torch.testing.assert_close(param.grad.double(), param64.grad, **summed)


# --------------------------------------------------------------------------- gated activations
def gated_inputs(shape, dtype: torch.dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(gate, up): gate spread wide enough to reach the activation's saturated tails; up of unit scale."""
    generator = torch.Generator().manual_seed(seed)
    gate = 3.0 * torch.randn(shape, generator=generator)
    up = torch.randn(shape, generator=generator)
    return gate.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)


def assert_gated_matches_float64(
    op, reference, shape, dtype: torch.dtype, device, tolerance: dict  # noqa: ANN001
) -> None:
    """``op(gate, up)`` against ``reference`` run in float64: output, grad of gate and grad of up, each in the input
    dtype and shape."""
    gate, up = gated_inputs(shape, dtype, device)
    gate.requires_grad_()
    up.requires_grad_()
    out = op(gate, up)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    out.backward(grad_out)
    gate64, up64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    expected = reference(gate64, up64)
    expected.backward(grad_out.double())

    assert out.dtype == dtype and out.shape == gate.shape
    assert gate.grad.dtype == dtype and up.grad.dtype == dtype
    torch.testing.assert_close(out.double(), expected.detach(), **tolerance)
    torch.testing.assert_close(gate.grad.double(), gate64.grad, **tolerance)
    torch.testing.assert_close(up.grad.double(), up64.grad, **tolerance)
