"""QLoRA linear layer ``y = x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T`` over a bitsandbytes NF4 weight.

One Triton pass turns the NF4 codes (and double-quantized block scales) into a temporary 16-bit
weight for cuBLAS, and the big GEMM accumulates onto the LoRA product (``addmm_``, beta=1), so the
layer makes none of the extra full-size elementwise passes that bitsandbytes + PEFT make. The LoRA
products that read a full-size tensor are Triton passes (``thin_products``): in backward, one read of
the output grad gives the grads of both B and the LoRA intermediate.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._shared import round_to_nearest
from .thin_products import thin_products

# bitsandbytes stores a weight as ceil(n/2) bytes of the flattened row-major [out, in] weight,
# element 2i in the high nibble of byte i and element 2i+1 in the low nibble.
# 4096 elements and 4 warps a program: ~2.4 TB/s on an H100 (2-8 warps, 1-8K elements within 5%).
_DEQUANT_ELEMENTS_PER_PROGRAM = 4096
_DEQUANT_WARPS = 4


# ----------------------------------------------------------------------------- reference


def _absmax_reference(quant_state) -> torch.Tensor:
    """fp32 scale of every `blocksize` block, undoing bitsandbytes' double quantization when present."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    codes = quant_state.absmax.long()
    block_of = torch.arange(codes.numel(), device=codes.device) // state2.blocksize
    # Multiply, round to fp32, then add: bitsandbytes does the two in separate steps (no fma).
    absmax = state2.code.float()[codes] * state2.absmax.float()[block_of]
    return absmax + quant_state.offset.float()


def dequantize_nf4_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The [out, in] weight in ``quant_state.dtype``, by plain indexing (same bits as bitsandbytes)."""
    numel = _numel(quant_state.shape)
    raw = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[:numel].long()
    scale = _absmax_reference(quant_state).repeat_interleave(quant_state.blocksize)[:numel]
    values = quant_state.code.float().to(packed.device)[nibbles] * scale
    return values.to(quant_state.dtype).reshape(quant_state.shape)


def qlora_linear_reference(x, weight4bit, quant_state, lora_A, lora_B, scaling, bias=None):
    """bitsandbytes Linear4bit + PEFT LoRA (dropout 0), every term in the input dtype."""
    weight = dequantize_nf4_reference(weight4bit, quant_state).to(x.dtype)
    base = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base + lora * scaling


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


# ----------------------------------------------------------------------------- dequantize kernel


@triton.jit
def _block_absmax(
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, block_mask, NESTED: tl.constexpr, NESTED_BS: tl.constexpr
):
    if NESTED:
        absmax_code = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blocks // NESTED_BS, mask=block_mask, other=0.0).to(tl.float32)
        value = tl.load(code2_ptr + absmax_code, mask=block_mask, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr).to(tl.float32)
        return value * scale2 + offset
    else:
        return tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0).to(tl.float32)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    QUANT_DTYPE: tl.constexpr,
):
    # A tile of whole quantization blocks: one scale per row, broadcast along it.
    HALF: tl.constexpr = BLOCKSIZE // 2
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    rows = tl.arange(0, BLOCKS_PER_PROGRAM)
    blocks = first_block + rows
    scale = _block_absmax(
        absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, blocks * BLOCKSIZE < numel, NESTED, NESTED_BS
    )

    # Contiguous byte loads; the high and low nibbles are interleaved back into element order.
    byte_offsets = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    bytes_left = (numel + 1) // 2 - first_block * HALF
    byte = tl.load(packed_ptr + first_block * HALF + byte_offsets, mask=byte_offsets < bytes_left, other=0)
    byte = byte.to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)).to(tl.float32) * scale[:, None]
    low = tl.load(code_ptr + (byte & 0xF)).to(tl.float32) * scale[:, None]
    value = tl.reshape(tl.interleave(high, low), (BLOCKS_PER_PROGRAM, BLOCKSIZE))
    # Round to the quantization dtype first, as bitsandbytes does before any `.to(x.dtype)`.
    value = round_to_nearest(round_to_nearest(value, QUANT_DTYPE), out_ptr.dtype.element_ty)

    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out_block = out_ptr + first_block * BLOCKSIZE
    tl.store(out_block + offsets, value.to(out_ptr.dtype.element_ty), mask=offsets < numel - first_block * BLOCKSIZE)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check_quant_state(quant_state) -> None:
    if quant_state.quant_type != "nf4":
        raise ValueError(f"only NF4 weights are supported, got quant_type={quant_state.quant_type!r}")
    if quant_state.nested and quant_state.offset is None:
        raise ValueError("a double-quantized QuantState needs its offset")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes NF4 tensor, bit for bit what ``dequantize_4bit`` gives.

    ``dtype`` (default ``quant_state.dtype``) is the storage dtype of the result; values are
    rounded to ``quant_state.dtype`` first, exactly like ``dequantize_4bit(...).to(dtype)``.
    """
    _check_quant_state(quant_state)
    device = packed.device
    raw = packed.reshape(-1).view(torch.uint8)
    numel = _numel(quant_state.shape)
    out = torch.empty(tuple(quant_state.shape), dtype=dtype or quant_state.dtype, device=device)
    if numel == 0:
        return out
    absmax = _on(quant_state.absmax, device)
    if quant_state.nested:
        state2 = quant_state.state2
        absmax2, code2, nested_bs = _on(state2.absmax, device), _on(state2.code, device), state2.blocksize
        offset = _on(torch.as_tensor(quant_state.offset, dtype=torch.float32), device)
    else:  # unused pointers: any tensor will do
        absmax2, code2, nested_bs, offset = absmax, absmax, 1, absmax
    blocksize = quant_state.blocksize
    blocks_per_program = max(1, _DEQUANT_ELEMENTS_PER_PROGRAM // blocksize)
    grid = (-(-numel // (blocksize * blocks_per_program)),)
    _dequantize_nf4_kernel[grid](
        raw,
        _on(quant_state.code, device),
        absmax,
        absmax2,
        code2,
        offset,
        out,
        numel,
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=quant_state.nested,
        NESTED_BS=nested_bs,
        QUANT_DTYPE=_TL_DTYPES[quant_state.dtype],
        num_warps=_DEQUANT_WARPS,
        # bitsandbytes rounds code2*scale2 before adding the offset; an fma would not.
        enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------- overlap


# Dequantization and the LoRA products are memory-bound and leave the GPU room: on a second stream they run beside
# the products (and, in backward, grad A beside the big GEMM) instead of after them.
OVERLAP_ON_SIDE_STREAM = True


@lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class _Beside:
    """Work queued on a side stream, after what the current stream has queued so far; without CUDA (or with
    ``OVERLAP_ON_SIDE_STREAM`` off) it simply runs in order."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda" and OVERLAP_ON_SIDE_STREAM
        if self.enabled:
            self.main, self.side = torch.cuda.current_stream(device), _side_stream(device)
            self.side.wait_stream(self.main)

    def start(self, work, *uses: torch.Tensor):  # noqa: ANN001, ANN205
        """``work()`` on the side stream (after the current stream's queue so far, once more); ``uses`` are the
        current stream's tensors it reads. Returns a handle for ``result``."""
        if not self.enabled:
            return work(), None
        self.side.wait_stream(self.main)
        for tensor in uses:
            tensor.record_stream(self.side)  # not reused before the side stream has read it
        with torch.cuda.stream(self.side):
            value = work()
        done = torch.cuda.Event()
        done.record(self.side)
        return value, done

    def result(self, handle) -> torch.Tensor:  # noqa: ANN001
        """The work's result, with the current stream waiting for it (and only for it)."""
        value, done = handle
        if done is not None:
            self.main.wait_event(done)
            value.record_stream(self.main)
        return value


# ----------------------------------------------------------------------------- autograd


class QLoRALinearFunction(torch.autograd.Function):
    """Forward and backward of the QLoRA linear on 2-D inputs; W frozen, all tensors in one dtype.

    `scaling` is applied to the tokens x r intermediates only, never to a full-size tensor.
    """

    @staticmethod
    def forward(ctx, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias):
        beside = _Beside(x.device)
        weight = beside.start(lambda: dequantize_nf4(weight4bit, quant_state, dtype=x.dtype))
        # tokens x r, kept for grad B; alpha scales it in the GEMM's epilogue (beta=0: the uninitialized
        # input is ignored). A single thin product is as fast in cuBLAS as in ``thin_products``.
        x_a = torch.addmm(x.new_empty(()), x, lora_A.t(), beta=0, alpha=scaling)
        # The small LoRA product (and bias) goes first, so the big GEMM adds it in its epilogue
        # (beta=1) instead of a later pass reading and rewriting the whole output.
        out = torch.addmm(bias, x_a, lora_B.t()) if bias is not None else torch.mm(x_a, lora_B.t())
        out.addmm_(x, beside.result(weight).t())
        del weight  # the 16-bit weight lives only for this matmul
        ctx.save_for_backward(x, weight4bit, lora_A, lora_B, x_a)
        ctx.quant_state, ctx.scaling = quant_state, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight4bit, lora_A, lora_B, x_a = ctx.saved_tensors
        needs_x, _, _, needs_A, needs_B, _, needs_bias = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_x = grad_A = grad_B = grad_bias = None
        beside = _Beside(grad_out.device)
        if needs_x:
            weight = beside.start(lambda: dequantize_nf4(weight4bit, ctx.quant_state, dtype=grad_out.dtype))
        if needs_x or needs_A or needs_B:
            # scaling * dy @ B, the grad of the LoRA intermediate, and grad B = dy.T @ x_a (x_a carries the scaling).
            grad_x_a, grad_B = thin_products(
                grad_out, lora_B if needs_x or needs_A else None, x_a if needs_B else None, right_scale=ctx.scaling
            )
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
        return grad_x, None, None, grad_A, grad_B, None, grad_bias


def qlora_linear(x, weight4bit, quant_state, lora_A, lora_B, scaling, bias=None) -> torch.Tensor:
    """``x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T`` for x of any leading shape.

    ``weight4bit``/``quant_state`` are a bitsandbytes NF4 ``Params4bit`` and its ``QuantState``
    (W is frozen); ``lora_A`` is [r, in], ``lora_B`` is [out, r]. Everything is computed in x's
    dtype (LoRA weights and bias are cast to it, differentiably); no dropout.
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
        lora_A.to(dtype),
        lora_B.to(dtype),
        float(scaling),
        None if bias is None else bias.to(dtype),
    )
    return out.reshape(*leading, out_features)
