"""``thin_products``: a large matrix times thin ones (LoRA's rank-r products), both products from one
read of it, against float64."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close_at_scale, dtype_id

from vlm.kernels.qlora.thin_products import DEFAULT_THIN_TILING, ThinTiling, thin_products, thin_products_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Errors are measured on results divided by the float64 result's RMS (sums grow with their length): a few
# units in the last place of each dtype, from one rounding of an fp32 sum.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
RAGGED = ThinTiling(block_m=16, block_n=32, num_warps=4, programs_per_sm=4)
MAX_RANK = DEFAULT_THIN_TILING.max_rank


def _random(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert_close_at_scale(actual, expected, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
@pytest.mark.parametrize("rank", [1, 8, 24, MAX_RANK, MAX_RANK + 8])
@pytest.mark.parametrize(
    "rows, cols, tiling",
    [
        (1, 48, DEFAULT_THIN_TILING),
        # Several column strips and row groups, each with a ragged last tile: every partial sum counts.
        (70, 100, RAGGED),
    ],
    ids=["one_row", "ragged_strips_and_groups"],
)
def test_both_products_from_one_pass_match_float64(rows, cols, tiling, rank, dtype):
    big, right, left = (_random(*shape, dtype=dtype, seed=i) for i, shape in enumerate([(rows, cols), (cols, rank), (rows, rank)]))
    big_right, big_t_left = thin_products(big, right, left, right_scale=0.3, tiling=tiling)

    f64 = [t.double() for t in (big, right, left)]
    _assert_close_at_scale(big_right, 0.3 * f64[0] @ f64[1], dtype)
    _assert_close_at_scale(big_t_left, f64[0].t() @ f64[2], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_either_product_alone_and_a_transposed_right_operand(dtype):
    big = _random(70, 100, dtype=dtype, seed=0)
    lora_A = _random(8, 100, dtype=dtype, seed=1)  # [r, in]: its .t() is the strided right operand
    left = _random(70, 8, dtype=dtype, seed=2)

    big_right, nothing = thin_products(big, lora_A.t(), None, right_scale=2.0, tiling=RAGGED)
    assert nothing is None
    _assert_close_at_scale(big_right, 2.0 * big.double() @ lora_A.double().t(), dtype)

    nothing, big_t_left = thin_products(big, None, left, tiling=RAGGED)
    assert nothing is None
    _assert_close_at_scale(big_t_left, big.double().t() @ left.double(), dtype)


def test_a_big_operand_with_padded_rows_is_read_through_its_stride():
    padded = _random(20, 64, dtype=torch.float32, seed=3)
    big = padded[:, :50]  # row stride 64, unit column stride
    right, left = _random(50, 4, dtype=torch.float32, seed=4), _random(20, 4, dtype=torch.float32, seed=5)
    big_right, big_t_left = thin_products(big, right, left, tiling=RAGGED)
    _assert_close_at_scale(big_right, big.double() @ right.double(), torch.float32)
    _assert_close_at_scale(big_t_left, big.double().t() @ left.double(), torch.float32)


def test_operands_it_cannot_read_are_refused():
    big = _random(8, 16, dtype=torch.float32, seed=6)
    with pytest.raises(ValueError, match="right, left or both"):
        thin_products(big, None, None)
    with pytest.raises(ValueError, match="unit column stride"):
        thin_products(big.t(), _random(8, 4, dtype=torch.float32, seed=7), None)
    with pytest.raises(ValueError, match="contiguous"):
        thin_products(big, None, _random(4, 8, dtype=torch.float32, seed=8).t())


def test_ranks_above_the_tilings_max_rank_are_cublas_products():
    shapes = [(70, 100), (100, 8), (70, 8)]
    big, right, left = (_random(*shape, dtype=torch.float32, seed=i) for i, shape in enumerate(shapes))
    actual = thin_products(big, right, left, 0.3, ThinTiling(block_m=16, block_n=32, max_rank=4))
    for product, expected in zip(actual, thin_products_reference(big, right, left, 0.3)):
        assert torch.equal(product, expected)
