"""The storage formats bitsandbytes loads linear weights into: their exact size, and what a weight
looks like after a round trip through them.

The round trip (quantize, then dequantize back to the weight's dtype) is what a quantized layer
multiplies with, so measuring errors with it needs no second, quantized copy of the model.
"""

from __future__ import annotations

import math

import torch

FOUR_BIT = ("nf4", "fp4")
BLOCKSIZE = 64  # elements per absmax block of the 4-bit formats (bitsandbytes' default)
NESTED_BLOCKSIZE = 256  # absmax values per block of the double-quantized absmax
QUANT_MAP_BYTES = 16 * 4  # the 16 fp32 code values each 4-bit layer carries
NESTED_MAP_BYTES = 256 * 4 + 4  # the 8-bit code of the nested absmax, plus its fp32 offset


def weight_bytes(shape: tuple[int, ...], method: str, double_quant: bool = True, dtype_bytes: int = 2) -> int:
    """Bytes a linear weight of ``shape`` occupies when stored as ``method`` (``none`` = 16-bit).

    Counts everything bitsandbytes keeps per layer: packed values, block scales, and the
    code tables (the nested ones too, with double quantization).
    """
    n = math.prod(shape)
    if method == "none":
        return n * dtype_bytes
    if method in FOUR_BIT:
        blocks = -(-n // BLOCKSIZE)
        packed = -(-n // 2)
        if double_quant:
            nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
            return packed + blocks + nested_blocks * 4 + QUANT_MAP_BYTES + NESTED_MAP_BYTES
        return packed + blocks * 4 + QUANT_MAP_BYTES
    if method == "int8":
        return n + shape[0] * 4  # int8 values and one fp32 scale per output row
    raise ValueError(f"unknown quantization method {method!r}")


@torch.no_grad()
def round_trip(weight: torch.Tensor, method: str, double_quant: bool = True) -> torch.Tensor:
    """``weight`` quantized as ``method`` and dequantized back to its own dtype and device."""
    import bitsandbytes.functional as bnb_f

    if method in FOUR_BIT:
        packed, state = bnb_f.quantize_4bit(
            weight.contiguous(),
            blocksize=BLOCKSIZE,
            compress_statistics=double_quant,
            quant_type=method,
            quant_storage=torch.uint8,
        )
        return bnb_f.dequantize_4bit(packed, state).to(weight.dtype)
    if method == "int8":
        # LLM.int8() stores weights row-wise absmax int8; its 16-bit path for activation outliers
        # is not simulated here, so this is the weight's share of the error only.
        values, scales, _ = bnb_f.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return (values.float() * (scales.float()[:, None] / 127.0)).to(weight.dtype)
    if method == "none":
        return weight.clone()
    raise ValueError(f"unknown quantization method {method!r}")
