"""Launch constants of the kernels that multiply tiles of a large operand by a rank-r matrix with ``tl.dot``
(``thin_products``, ``widen_with_lora``)."""

import torch
import triton


def rank_dot_constants(operand: torch.Tensor, rank: int) -> dict:
    """``RANK``, the rank padded to a power of two of at least 16 (``tl.dot``'s narrowest; the pad loads as zeros),
    ``PRECISION`` (exact products for fp32) and ``DOT_IN_FP32`` (off the GPU: Triton's CPU interpreter gets bf16
    dots wrong, while fp32 products of the same values are exact)."""
    return dict(
        RANK=max(16, triton.next_power_of_2(rank)),
        PRECISION="ieee" if operand.dtype == torch.float32 or not operand.is_cuda else "tf32",
        DOT_IN_FP32=not operand.is_cuda,
    )
