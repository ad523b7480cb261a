"""QLoRA linear layer ``y = x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T`` over a bitsandbytes NF4 weight.

One Triton pass turns the NF4 codes (and double-quantized block scales) into a temporary 16-bit
weight for cuBLAS (``qlora.nf4``). Where the output is wider than the input, the forward is one GEMM over
``[x | x_a]`` and ``[W | B]`` (``qlora.widen_with_lora``), so the LoRA term is summed inside it; otherwise the
big GEMM accumulates onto the LoRA product (``addmm_``, beta=1). Either way the layer makes none of the
extra full-size elementwise passes that bitsandbytes + PEFT make. In backward, one read of the output
grad gives the grads of both B and the LoRA intermediate (``qlora.thin_products``). Dequantization and the
small products run on a side stream beside the big ones (``qlora.side_stream``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._settings import require_at_least
from .qlora.nf4 import dequantize_nf4, dequantize_nf4_reference, dequantize_nf4_widened, widens_nf4
from .qlora.side_stream import SideStream
from .qlora.thin_products import DEFAULT_THIN_TILING, ThinTiling, thin_products, thin_products_reference
from .qlora.widen_with_lora import widen_with_lora, widened_width

__all__ = [
    "DEFAULT_QLORA_TUNING",
    "QLoRALinearFunction",
    "QLoRATuning",
    "dequantize_nf4",  # re-exported from qlora.nf4, where they live, for the imports that predate it
    "dequantize_nf4_reference",
    "dequantize_nf4_widened",
    "lora_inside_gemm",
    "qlora_linear",
    "qlora_linear_reference",
]


@dataclass(frozen=True)
class QLoRATuning:
    """Launch choices of ``qlora_linear``. On an H100 (r 16), forward+backward with the LoRA term inside the GEMM
    against before it: 4096->14336 2743 against 2808 µs at 8192 tokens and 796 against 811 at 2048; 4096->4096
    the same; 14336->4096 2939 against 2860 (x is the large tensor there)."""

    # Dequantization (memory-bound) and grad A leave the GPU room: on a second stream they run beside the products
    # and the big GEMM instead of after them.
    overlap_on_side_stream: bool = True
    # The LoRA term goes inside the big GEMM, ``[x | x_a] @ [W | B].T``, when the output is at least this many times
    # wider than the input: copying x into the wider buffer then costs less than writing and rereading a full-size
    # LoRA product.
    lora_inside_gemm_min_widening: float = 1.0
    # Each rank is one more step of the GEMM's sum (and one more column of Tensor Core work in the copy).
    lora_inside_gemm_max_rank: int = 32
    # The backward's ``scaling * dy @ B`` and ``dy.T @ x_a`` from one read of dy.
    thin_products: ThinTiling = DEFAULT_THIN_TILING
    # Up to this many rows (tokens), a layer's GPU work takes less time than the host takes to queue it, so
    # the whole step waits on the host: fewer launches then beat fewer bytes. Such a layer uses neither the
    # side stream (its events and waits cost the host ~0.45 ms a layer, forward and backward, on an H200)
    # nor the thin products (two launches), but one cuBLAS product each. 0: never.
    host_bound_max_rows: int = 4096

    def __post_init__(self) -> None:
        require_at_least(self, 0, "lora_inside_gemm_min_widening", "lora_inside_gemm_max_rank", "host_bound_max_rows")

    def host_bound(self, rows: int) -> bool:
        return rows <= self.host_bound_max_rows


DEFAULT_QLORA_TUNING = QLoRATuning()


def qlora_linear_reference(x, weight4bit, quant_state, lora_A, lora_B, scaling, bias=None):
    """bitsandbytes Linear4bit + PEFT LoRA (dropout 0), every term in the input dtype."""
    weight = dequantize_nf4_reference(weight4bit, quant_state).to(x.dtype)
    base = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base + lora * scaling


def lora_inside_gemm(quant_state, rank: int, tuning: QLoRATuning) -> bool:
    """Whether the forward sums the LoRA term inside the big GEMM (``[x | x_a] @ [W | B].T``) rather than
    accumulating the GEMM onto the LoRA product."""
    out_features, in_features = (int(s) for s in quant_state.shape)
    return (
        widens_nf4(quant_state) and in_features > 0 and rank <= tuning.lora_inside_gemm_max_rank
        and out_features >= tuning.lora_inside_gemm_min_widening * in_features
    )


def _forward_lora_inside_gemm(beside, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias):  # noqa: ANN001
    """One GEMM over ``[x | x_a | 0]`` and ``[W | B | 0]``: the low-rank term is summed with the rest."""
    in_features, rank = x.shape[1], lora_A.shape[0]
    width = widened_width(in_features, rank)
    weight = beside.start(lambda: dequantize_nf4_widened(weight4bit, quant_state, lora_B, width), lora_B)
    x_wide, x_a = widen_with_lora(x, lora_A, scaling, width)
    # The zero columns past in + r are left out of the sum; they only pad the rows (see ``widened_width``).
    used = in_features + rank
    lhs, rhs = x_wide[:, :used], beside.result(weight)[:, :used].t()
    out = torch.addmm(bias, lhs, rhs) if bias is not None else torch.mm(lhs, rhs)
    return out, x_a


def _forward_lora_before_gemm(beside, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias):  # noqa: ANN001
    """The LoRA product first, then the big GEMM accumulating onto it."""
    weight = beside.start(lambda: dequantize_nf4(weight4bit, quant_state, dtype=x.dtype))
    # tokens x r, kept for grad B; alpha scales it in the GEMM's epilogue (beta=0: the uninitialized
    # input is ignored). A single thin product is as fast in cuBLAS as in ``thin_products``.
    x_a = torch.addmm(x.new_empty(()), x, lora_A.t(), beta=0, alpha=scaling)
    # The small LoRA product (and bias) goes first, so the big GEMM adds it in its epilogue
    # (beta=1) instead of a later pass reading and rewriting the whole output.
    out = torch.addmm(bias, x_a, lora_B.t()) if bias is not None else torch.mm(x_a, lora_B.t())
    out.addmm_(x, beside.result(weight).t())
    return out, x_a


class QLoRALinearFunction(torch.autograd.Function):
    """Forward and backward of the QLoRA linear on 2-D inputs; W frozen, x and bias in one dtype, the LoRA
    weights in any (cast to x's inside).

    `scaling` is applied to the tokens x r intermediates only, never to a full-size tensor.
    """

    @staticmethod
    def forward(ctx, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias, tuning: QLoRATuning):
        # LoRA weights kept in another dtype (fp32) are cast here rather than by autograd: two graph nodes
        # fewer per layer and pass, and their grads go back in their own dtype, as a cast's backward gives them.
        ctx.lora_dtypes = lora_A.dtype, lora_B.dtype
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        beside = SideStream(x.device, tuning.overlap_on_side_stream and not tuning.host_bound(x.shape[0]))
        if lora_inside_gemm(quant_state, lora_A.shape[0], tuning):
            out, x_a = _forward_lora_inside_gemm(beside, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias)
        else:
            out, x_a = _forward_lora_before_gemm(beside, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias)
        ctx.save_for_backward(x, weight4bit, lora_A, lora_B, x_a)
        ctx.quant_state, ctx.scaling, ctx.tuning = quant_state, scaling, tuning
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight4bit, lora_A, lora_B, x_a = ctx.saved_tensors
        needs_x, _, _, needs_A, needs_B, _, needs_bias, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_x = grad_A = grad_B = grad_bias = None
        tuning = ctx.tuning
        host_bound = tuning.host_bound(grad_out.shape[0])
        beside = SideStream(grad_out.device, tuning.overlap_on_side_stream and not host_bound)
        if needs_x:
            weight = beside.start(lambda: dequantize_nf4(weight4bit, ctx.quant_state, dtype=grad_out.dtype))
        if needs_x or needs_A or needs_B:
            # scaling * dy @ B, the grad of the LoRA intermediate, and grad B = dy.T @ x_a (x_a carries the scaling).
            operands = grad_out, lora_B if needs_x or needs_A else None, x_a if needs_B else None
            if host_bound:  # one cuBLAS launch per product
                grad_x_a, grad_B = thin_products_reference(*operands, right_scale=ctx.scaling)
            else:
                grad_x_a, grad_B = thin_products(*operands, right_scale=ctx.scaling, tiling=tuning.thin_products)
        if needs_A:
            grad_A = beside.start(lambda: torch.mm(grad_x_a.t(), x), grad_x_a, x)
        if needs_x:
            grad_x = torch.mm(grad_x_a, lora_A)
            grad_x.addmm_(grad_out, beside.result(weight))  # beta=1: accumulates in the GEMM epilogue
            del weight
        if needs_A:
            grad_A = beside.result(grad_A)
        if needs_bias:
            grad_bias = grad_out.sum(0)
        dtype_A, dtype_B = ctx.lora_dtypes
        grad_A = None if grad_A is None else grad_A.to(dtype_A)
        grad_B = None if grad_B is None else grad_B.to(dtype_B)
        return grad_x, None, None, grad_A, grad_B, None, grad_bias, None


def qlora_linear(
    x, weight4bit, quant_state, lora_A, lora_B, scaling, bias=None, *, tuning: QLoRATuning = DEFAULT_QLORA_TUNING
) -> torch.Tensor:
    """``x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T`` for x of any leading shape.

    ``weight4bit``/``quant_state`` are a bitsandbytes NF4 ``Params4bit`` and its ``QuantState``
    (W is frozen); ``lora_A`` is [r, in], ``lora_B`` is [out, r]. Everything is computed in x's
    dtype (LoRA weights and bias are cast to it, differentiably: grads come back in their own
    dtypes); no dropout. ``tuning`` holds the launch choices (see ``QLoRATuning``).
    """
    out_features, in_features = (int(s) for s in quant_state.shape)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    leading = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    dtype = x.dtype
    # Params4bit's __torch_function__ costs host time on every op; its plain storage is enough.
    packed = weight4bit.data if isinstance(weight4bit, torch.nn.Parameter) else weight4bit
    out = QLoRALinearFunction.apply(
        x2d,
        packed,
        quant_state,
        lora_A,  # cast to x's dtype inside, see QLoRALinearFunction.forward
        lora_B,
        float(scaling),
        None if bias is None else bias.to(dtype),
        tuning,
    )
    return out.reshape(*leading, out_features)
