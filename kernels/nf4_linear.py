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

__all__ = ["FrozenNF4LinearFunction", "FrozenNF4LoRALinearFunction", "dequantize_nf4_op", "nf4_linear", "nf4_linear_reference",
           "nf4_lora_linear", "nf4_lora_linear_reference"]


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


class FrozenNF4LoRALinearFunction(torch.autograd.Function):
    """``x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T`` on 2-D ``x``, W frozen, every term in x's dtype.

    Each product's result is one tensor: the big GEMM accumulates onto the LoRA product (``addmm``), forward and
    backward. Written as PEFT writes it (two full-size products and their scaled sum),
    a compiled program fuses the sum into its consumers and keeps both products alive until then: in a
    checkpointed layer's backward, twice the gated MLP's intermediates (on one H200, 10 of Llama-3.2-11B-Vision's
    2048 x 14336 tensors alive at the step's peak)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling, packed, code, absmax, absmax2, code2, offset, bias,  # noqa: ANN001, ANN205
                out_features, in_features, blocksize, nested_blocksize, quant_dtype):
        layout = (out_features, in_features, blocksize, nested_blocksize, quant_dtype)
        weight = dequantize_nf4_op(packed, code, absmax, absmax2, code2, offset, *layout, x.dtype)
        x_a = torch.mm(x, lora_A.t()) * scaling  # tokens x r: the scaling on the small tensor
        # The LoRA product first, then the big GEMM accumulating onto it. Where addmm adds its input in fp32 (the
        # CPU) the sum is rounded once, so an adapter's early updates, far below a bf16 step of the base product,
        # reach the output; cuBLAS on an H200 rounds the product first and loses most of them, as PEFT's sum does.
        lora = torch.mm(x_a, lora_B.t()) if bias is None else torch.addmm(bias, x_a, lora_B.t())
        out = torch.addmm(lora, x, weight.t())
        ctx.save_for_backward(x, x_a, lora_A, lora_B, packed, code, absmax, absmax2, code2, offset)
        ctx.layout, ctx.scaling = layout, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, x_a, lora_A, lora_B, *storage = ctx.saved_tensors
        needs_x, needs_A, needs_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = grad_bias = None
        grad_x_a = torch.mm(grad_out, lora_B) * ctx.scaling
        if needs_B:
            grad_B = torch.mm(grad_out.t(), x_a)
        if needs_A:
            grad_A = torch.mm(grad_x_a.t(), x)
        if needs_x:
            weight = dequantize_nf4_op(*storage, *ctx.layout, grad_out.dtype)
            grad_x = torch.addmm(torch.mm(grad_x_a, lora_A), grad_out, weight)
        if ctx.needs_input_grad[10]:
            grad_bias = grad_out.sum(0)
        return (grad_x, grad_A, grad_B, None, None, None, None, None, None, None, grad_bias,
                None, None, None, None, None)


def nf4_lora_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, lora_A: torch.Tensor, lora_B: torch.Tensor,  # noqa: ANN001
                    scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias + scaling * (x @ A.T) @ B.T`` for x of any leading shape, with the NF4 weight of a
    bitsandbytes ``Linear4bit`` and LoRA's A [r, in] and B [out, r], all in x's dtype; traceable by
    ``torch.compile`` without a graph break."""
    tensors, layout = _storage_args(quant_state)
    leading = x.shape[:-1]
    out = FrozenNF4LoRALinearFunction.apply(x.reshape(-1, x.shape[-1]), lora_A, lora_B, float(scaling), packed,
                                            *tensors, bias, *layout)
    return out.reshape(*leading, out.shape[-1])


def nf4_lora_linear_reference(x: torch.Tensor, packed: torch.Tensor, quant_state, lora_A: torch.Tensor,  # noqa: ANN001
                              lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What PEFT computes over a bitsandbytes ``Linear4bit``: the base layer's result and the scaled adapter's, each
    in x's dtype, then their sum; by plain indexing and autograd."""
    adapter = F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scaling
    return nf4_linear_reference(x, packed, quant_state, bias) + adapter
