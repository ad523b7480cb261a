"""NF4 dequantization against bitsandbytes' own, bit for bit: every shape, block size, dtype and double
quantization, also into another dtype and widened to ``[W | B | 0]`` for the QLoRA forward's single GEMM."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_same_bits, dtype_id, quantized_nf4_weight

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from vlm.kernels.qlora.nf4 import (  # noqa: E402
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_storage,
    dequantize_nf4_widened,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("quant_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize(
    "shape",
    [(3, 100), (5, 7), (1, 1), (300, 257), (64, 256)],
    ids=["blocks_straddle_rows", "odd_element_count", "one_element", "not_multiple_of_64x256", "aligned"],
)
def test_dequantize_nf4_equals_bitsandbytes_bit_for_bit(shape, quant_dtype, double_quant):
    generator = torch.Generator().manual_seed(0)
    packed, quant_state = quantized_nf4_weight(*shape, quant_dtype, double_quant, generator, DEVICE)
    expected = bnb_functional.dequantize_4bit(packed, quant_state)
    assert_same_bits(dequantize_nf4(packed, quant_state), expected)
    assert_same_bits(dequantize_nf4_reference(packed, quant_state), expected)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_dequantize_nf4_equals_bitsandbytes_for_other_blocksizes(blocksize):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(70, 130, generator=generator).to(DEVICE, torch.bfloat16)
    packed, quant_state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4"
    )
    assert_same_bits(dequantize_nf4(packed, quant_state), bnb_functional.dequantize_4bit(packed, quant_state))


@pytest.mark.parametrize("quant_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
def test_dequantize_nf4_into_another_dtype_equals_bitsandbytes_then_cast(quant_dtype, out_dtype):
    generator = torch.Generator().manual_seed(1)
    packed, quant_state = quantized_nf4_weight(33, 130, quant_dtype, True, generator, DEVICE)
    expected = bnb_functional.dequantize_4bit(packed, quant_state).to(out_dtype)
    assert_same_bits(dequantize_nf4(packed, quant_state, dtype=out_dtype), expected)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("rank, width", [(1, 192), (16, 256), (8, 136)], ids=["rank1_padded", "rank16_padded", "unpadded"])
def test_widened_dequantization_is_weight_then_lora_b_then_zeros(rank, width, double_quant):
    generator = torch.Generator().manual_seed(7)
    packed, quant_state = quantized_nf4_weight(70, 128, torch.bfloat16, double_quant, generator, DEVICE)
    right = torch.randn(70, rank, generator=generator).to(DEVICE, torch.bfloat16)
    wide = dequantize_nf4_widened(packed, quant_state, right, width)

    assert wide.shape == (70, width)
    assert_same_bits(wide[:, :128].contiguous(), bnb_functional.dequantize_4bit(packed, quant_state))
    assert_same_bits(wide[:, 128:128 + rank].contiguous(), right)
    assert torch.equal(wide[:, 128 + rank:], torch.zeros_like(wide[:, 128 + rank:]))


def test_widened_dequantization_reads_a_transposed_right_operand_and_refuses_split_blocks():
    generator = torch.Generator().manual_seed(8)
    packed, quant_state = quantized_nf4_weight(40, 64, torch.float32, True, generator, DEVICE)
    right = torch.randn(4, 40, generator=generator).to(DEVICE).t()  # [40, 4], column-major
    wide = dequantize_nf4_widened(packed, quant_state, right, 128)
    assert_same_bits(wide[:, 64:68].contiguous(), right.contiguous())
    packed, quant_state = quantized_nf4_weight(40, 100, torch.float32, True, generator, DEVICE)  # rows end mid-block
    with pytest.raises(ValueError, match="whole blocks"):
        dequantize_nf4_widened(packed, quant_state, right, 128)


def test_the_qlora_linear_module_still_offers_the_dequantization_under_its_names():
    from vlm.kernels import qlora_linear
    from vlm.kernels.qlora import nf4

    for name in ("dequantize_nf4", "dequantize_nf4_reference", "dequantize_nf4_widened"):
        assert getattr(qlora_linear, name) is getattr(nf4, name)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("shape", [(3, 100), (70, 130), (64, 256)], ids=["blocks_straddle_rows", "odd_blocks", "aligned"])
def test_dequantization_from_the_storage_tensors_equals_bitsandbytes(shape, double_quant):
    """The lean launch the compiled layers' operator makes, from the tensors rather than a QuantState."""
    generator = torch.Generator().manual_seed(3)
    packed, quant_state = quantized_nf4_weight(*shape, torch.bfloat16, double_quant, generator, DEVICE)
    nested = None
    if double_quant:
        state2 = quant_state.state2
        nested = (state2.absmax, state2.code, quant_state.offset.reshape(()).float(), state2.blocksize)
    weight = dequantize_nf4_storage(packed, quant_state.code, quant_state.absmax, nested, shape, quant_state.blocksize,
                                    torch.bfloat16, torch.float32)
    assert_same_bits(weight, bnb_functional.dequantize_4bit(packed, quant_state).float())
