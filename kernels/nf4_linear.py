"""A frozen NF4 linear ``y = x @ dequant(W).T + bias`` that ``torch.compile`` sees through.

bitsandbytes runs a 4-bit layer's forward as one opaque operator whose Python body dequantizes and multiplies
(``gemm_4bit``), and its backward as more Python. A compiled graph then still pays that Python at every call:
about 0.28 ms of host time for each of the 800 such calls in an 11B model's step. Here the dequantization is
a Triton operator of its own (``vlm::dequantize_nf4``: the kernel of ``qlora.nf4`` on CUDA, the plain indexing
reference elsewhere), and the product is aten's, so the compiled program launches both itself and plans their
memory with the rest of the layer. The autograd Function saves the packed weight, not the dequantized one: the
backward dequantizes again, as bitsandbytes does, so no 16-bit copy of a weight outlives its use.

The weight bits are bitsandbytes' (``dequantize_4bit``), so the layer computes what ``Linear4bit`` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlora.nf4 import (
    dequantize_nf4_reference,
    dequantize_nf4_storage,
    dequantize_nf4_storage_reference,
    storage_tensors,
)

__all__ = ["FrozenNF4LinearFunction", "dequantize_nf4_op", "nf4_linear", "nf4_linear_reference"]


@torch.library.triton_op("vlm::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
    quant_dtype: torch.dtype,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The [out, in] NF4 weight in ``dtype`` (rounded to ``quant_dtype`` first): the Triton kernel on CUDA, plain
    indexing elsewhere. A Triton operator: a compiled program launches the kernel itself, with none of this
    function's Python, and on the CPU it compiles the indexing with the rest of the layer."""
    nested = None if absmax2 is None else (absmax2, code2, offset, nested_blocksize)
    shape = (out_features, in_features)
    if packed.device.type != "cuda":
        return dequantize_nf4_storage_reference(packed, code, absmax, nested, shape, blocksize, quant_dtype).to(dtype)
    return dequantize_nf4_storage(packed.view(torch.uint8), code, absmax, nested, shape, blocksize, quant_dtype, dtype,
                                  wrap_kernel=torch.library.wrap_triton)


def _storage_args(quant_state) -> tuple:  # noqa: ANN001
    """The operator's tensors and its layout arguments, from a bitsandbytes ``QuantState``."""
    code, absmax, nested = storage_tensors(quant_state, quant_state.absmax.device)
    absmax2, code2, offset, nested_blocksize = nested if nested is not None else (None, None, None, 0)
    out_features, in_features = (int(s) for s in quant_state.shape)
    return (code, absmax, absmax2, code2, offset), (out_features, in_features, quant_state.blocksize, nested_blocksize,
                                                    quant_state.dtype)


class FrozenNF4LinearFunction(torch.autograd.Function):
    """``x @ dequant(W).T + bias`` with no grad for W; saves the packed weight and its scales only."""

    @staticmethod
    def forward(ctx, x, packed, code, absmax, absmax2, code2, offset, bias,  # noqa: ANN001, ANN205
                out_features, in_features, blocksize, nested_blocksize, quant_dtype):
        layout = (out_features, in_features, blocksize, nested_blocksize, quant_dtype, x.dtype)
        weight = dequantize_nf4_op(packed, code, absmax, absmax2, code2, offset, *layout)
        ctx.save_for_backward(packed, code, absmax, absmax2, code2, offset)
        ctx.layout = layout
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output.matmul(dequantize_nf4_op(*ctx.saved_tensors, *ctx.layout))
        if ctx.needs_input_grad[7]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None, None


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ANN001
    """``x @ W.T + bias`` for the NF4 weight ``packed`` / ``quant_state`` of a bitsandbytes ``Linear4bit``,
    dequantized to ``x``'s dtype; traceable by ``torch.compile`` without a graph break."""
    tensors, layout = _storage_args(quant_state)
    return FrozenNF4LinearFunction.apply(x, packed, *tensors, bias, *layout)


def nf4_linear_reference(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ANN001
    """What bitsandbytes' ``Linear4bit`` computes, by plain indexing and autograd."""
    weight = dequantize_nf4_reference(packed, quant_state).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
