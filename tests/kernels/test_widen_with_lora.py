"""``widen_with_lora``: x copied into a wider buffer beside ``x_a = scale * x @ A.T`` and zeros, from one read of x."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close_at_scale, dtype_id

from vlm.kernels.qlora.widen_with_lora import (
    ROW_ALIGNMENT,
    widen_with_lora,
    widen_with_lora_reference,
    widened_width,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# x_a is one fp32 sum rounded once; errors are relative to its RMS: a few units in the last place.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def _random(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def test_the_width_is_features_plus_rank_rounded_up():
    assert widened_width(4096, 16) == 4096 + ROW_ALIGNMENT
    assert widened_width(100, 3) == 128
    assert widened_width(128, 0) == 128


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
@pytest.mark.parametrize("rank", [1, 3, 16, 24])
@pytest.mark.parametrize(
    "rows, cols, padded",
    [(1, 64, True), (70, 300, True), (33, 100, False)],
    ids=["one_row", "ragged_row_and_column_tiles", "no_padding_columns"],
)
def test_copy_is_exact_lora_product_matches_float64_and_padding_is_zero(rows, cols, padded, rank, dtype):
    x, lora_A = _random(rows, cols, dtype=dtype, seed=0), _random(rank, cols, dtype=dtype, seed=1)
    width = widened_width(cols, rank) if padded else cols + rank
    wide, x_a = widen_with_lora(x, lora_A, 0.3, width)

    assert wide.shape == (rows, width) and wide.dtype == dtype and x_a.dtype == dtype
    assert torch.equal(wide[:, :cols], x)
    assert_close_at_scale(x_a, 0.3 * x.double() @ lora_A.double().t(), TOLERANCES[dtype])
    assert torch.equal(wide[:, cols:cols + rank], x_a)
    assert torch.equal(wide[:, cols + rank:], torch.zeros_like(wide[:, cols + rank:]))


def test_kernel_and_reference_agree():
    x, lora_A = _random(40, 200, dtype=torch.float32, seed=2), _random(8, 200, dtype=torch.float32, seed=3)
    width = widened_width(200, 8)
    for actual, expected in zip(widen_with_lora(x, lora_A, 2.0, width), widen_with_lora_reference(x, lora_A, 2.0, width)):
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])


def test_a_strided_input_and_a_transposed_lora_a_are_read_through_their_strides():
    padded = _random(20, 96, dtype=torch.float32, seed=4)
    x = padded[:, :70]  # row stride 96
    lora_A = _random(70, 4, dtype=torch.float32, seed=5).t()  # [4, 70], column-major
    wide, x_a = widen_with_lora(x, lora_A, 1.0, widened_width(70, 4))
    assert torch.equal(wide[:, :70], x)
    assert_close_at_scale(x_a, x.double() @ lora_A.double().t(), TOLERANCES[torch.float32])


def test_inputs_it_cannot_use_are_refused():
    x = _random(8, 32, dtype=torch.float32, seed=6)
    with pytest.raises(ValueError, match="does not fit"):
        widen_with_lora(x, _random(4, 31, dtype=torch.float32, seed=7), 1.0, 64)
    with pytest.raises(ValueError, match="does not fit"):
        widen_with_lora(x, _random(4, 32, dtype=torch.float64, seed=7), 1.0, 64)
    with pytest.raises(ValueError, match="less than"):
        widen_with_lora(x, _random(4, 32, dtype=torch.float32, seed=7), 1.0, 35)
    with pytest.raises(ValueError, match="unit column stride"):
        widen_with_lora(_random(32, 8, dtype=torch.float32, seed=8).t(), _random(4, 32, dtype=torch.float32, seed=7), 1.0, 64)


def test_no_rows_gives_empty_results():
    wide, x_a = widen_with_lora(torch.empty(0, 32, device=DEVICE), _random(4, 32, dtype=torch.float32, seed=9), 1.0, 64)
    assert wide.shape == (0, 64) and x_a.shape == (0, 4)
