"""QLoRA linear layer ``y = x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T`` over a bitsandbytes NF4 weight.

One Triton pass turns the NF4 codes (and double-quantized block scales) into a temporary 16-bit
weight for cuBLAS. Where the output is wider than the input, the forward is one GEMM over
``[x | x_a]`` and ``[W | B]`` (``widen_with_lora``), so the LoRA term is summed inside it; otherwise the
big GEMM accumulates onto the LoRA product (``addmm_``, beta=1). Either way the layer makes none of the
extra full-size elementwise passes that bitsandbytes + PEFT make. In backward, one read of the output
grad gives the grads of both B and the LoRA intermediate (``thin_products``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._shared import round_to_nearest
from .thin_products import thin_products
from .widen_with_lora import widen_with_lora, widened_width

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
    weight_programs,
    right_ptr,
    in_features,
    out_row_length,
    out_features,
    rank,
    right_row_stride,
    right_rank_stride,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    QUANT_DTYPE: tl.constexpr,
    WIDENED: tl.constexpr,
    RANK: tl.constexpr,
    PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < weight_programs:
        _dequantize_blocks(
            packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel, in_features,
            out_row_length, pid, BLOCKSIZE, BLOCKS_PER_PROGRAM, NESTED, NESTED_BS, QUANT_DTYPE, WIDENED,
        )
    else:  # the programs past the weight's write the columns after each row: `right`'s row, then zeros
        rows = ((pid - weight_programs) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)).to(tl.int64)
        row_ok = (rows < out_features)[:, None]
        ranks = tl.arange(0, RANK)[None, :]
        right = tl.load(right_ptr + rows[:, None] * right_row_stride + ranks * right_rank_stride,
                        mask=row_ok & (ranks < rank), other=0.0)
        tail = out_ptr + rows[:, None] * out_row_length + in_features
        tl.store(tail + ranks, right.to(out_ptr.dtype.element_ty), mask=row_ok & (ranks < rank))
        pad = rank + tl.arange(0, PAD)[None, :]
        tl.store(tail + pad, tl.zeros((BLOCKS_PER_PROGRAM, PAD), dtype=out_ptr.dtype.element_ty),
                 mask=row_ok & (in_features + pad < out_row_length))


@triton.jit
def _dequantize_blocks(
    packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel, in_features, out_row_length,
    pid, BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
    QUANT_DTYPE: tl.constexpr, WIDENED: tl.constexpr,
):
    # A tile of whole quantization blocks: one scale per row, broadcast along it.
    HALF: tl.constexpr = BLOCKSIZE // 2
    first_block = pid.to(tl.int64) * BLOCKS_PER_PROGRAM
    rows = tl.arange(0, BLOCKS_PER_PROGRAM)
    blocks = first_block + rows
    block_ok = blocks * BLOCKSIZE < numel
    scale = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, block_ok, NESTED, NESTED_BS)

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
    value = value.to(out_ptr.dtype.element_ty)

    in_block = tl.arange(0, BLOCKSIZE)[None, :]
    if WIDENED:  # rows of `out_row_length`, each starting with a weight row of whole blocks
        blocks_per_row = in_features // BLOCKSIZE
        block_index = pid * BLOCKS_PER_PROGRAM + rows  # int32 (fewer than 2**31 blocks): a cheap division
        weight_row = block_index // blocks_per_row
        start = weight_row.to(tl.int64) * out_row_length + (block_index - weight_row * blocks_per_row) * BLOCKSIZE
        tl.store(out_ptr + start[:, None] + in_block, value, mask=block_ok[:, None])
    else:
        offsets = rows[:, None] * BLOCKSIZE + in_block
        out_block = out_ptr + first_block * BLOCKSIZE
        tl.store(out_block + offsets, value, mask=offsets < numel - first_block * BLOCKSIZE)


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
    return _dequantize(packed, quant_state, dtype or quant_state.dtype)


def dequantize_nf4_widened(packed: torch.Tensor, quant_state, right: torch.Tensor, width: int) -> torch.Tensor:
    """``[W | right | 0]`` [out, width] in ``right``'s dtype: the NF4 weight as ``dequantize_nf4`` gives it, then
    ``right`` [out, r] (LoRA's B), then zeros. The weight's rows must be whole quantization blocks
    (``widens_nf4``)."""
    out_features, in_features = (int(s) for s in quant_state.shape)
    if not widens_nf4(quant_state):
        raise ValueError(f"rows of {in_features} are not whole blocks of {quant_state.blocksize}")
    if right.shape[0] != out_features or width < in_features + right.shape[1]:
        raise ValueError(f"right {tuple(right.shape)} and width {width} do not fit a [{out_features}, {in_features}] weight")
    return _dequantize(packed, quant_state, right.dtype, right, width)


def widens_nf4(quant_state) -> bool:
    """Whether ``dequantize_nf4_widened`` takes this weight: its rows are whole quantization blocks."""
    return int(quant_state.shape[1]) % quant_state.blocksize == 0


def _dequantize(packed, quant_state, dtype, right=None, width=None) -> torch.Tensor:  # noqa: ANN001
    _check_quant_state(quant_state)
    device = packed.device
    raw = packed.reshape(-1).view(torch.uint8)
    numel = _numel(quant_state.shape)
    out_features, in_features = (int(s) for s in quant_state.shape)
    out = torch.empty((out_features, width) if right is not None else tuple(quant_state.shape), dtype=dtype, device=device)
    if numel == 0:
        if right is not None:  # no weight columns: just [right | 0]
            out.zero_()[:, in_features:in_features + right.shape[1]] = right
        return out
    absmax = _on(quant_state.absmax, device)
    if quant_state.nested:
        state2 = quant_state.state2
        absmax2, code2, nested_bs = _on(state2.absmax, device), _on(state2.code, device), state2.blocksize
        offset = _on(torch.as_tensor(quant_state.offset, dtype=torch.float32), device)
    else:  # unused pointers: any tensor will do
        absmax2, code2, nested_bs, offset = absmax, absmax, 1, absmax
    rank = 0 if right is None else right.shape[1]
    blocksize = quant_state.blocksize
    blocks_per_program = max(1, _DEQUANT_ELEMENTS_PER_PROGRAM // blocksize)
    weight_programs = -(-numel // (blocksize * blocks_per_program))
    # Widened: one more program per `blocks_per_program` rows, for the columns after the weight's.
    tail_programs = 0 if right is None else -(-out_features // blocks_per_program)
    _dequantize_nf4_kernel[(weight_programs + tail_programs,)](
        raw,
        _on(quant_state.code, device),
        absmax,
        absmax2,
        code2,
        offset,
        out,
        numel,
        weight_programs,
        out if right is None else right,
        in_features,
        out.shape[1],
        out_features,
        rank,
        0 if right is None else right.stride(0),
        0 if right is None else right.stride(1),
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=quant_state.nested,
        NESTED_BS=nested_bs,
        QUANT_DTYPE=_TL_DTYPES[quant_state.dtype],
        WIDENED=right is not None,
        RANK=max(1, triton.next_power_of_2(rank)),
        PAD=triton.next_power_of_2(max(1, out.shape[1] - in_features - rank)),
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


# The forward's LoRA term goes inside the big GEMM, ``[x | x_a] @ [W | B].T``, when the output is at least this
# many times wider than the input: copying x into the wider buffer then costs less than writing and rereading a
# full-size LoRA product. On an H100 (r 16), forward+backward: 4096->14336 2743 against 2808 µs at 8192 tokens
# and 796 against 811 at 2048; 4096->4096 the same; 14336->4096 2939 against 2860 (x is the large tensor there).
LORA_INSIDE_GEMM_MIN_WIDENING = 1.0
# Each rank is one more step of the GEMM's sum (and one more column of Tensor Core work in the copy).
LORA_INSIDE_GEMM_MAX_RANK = 32


def _lora_inside_gemm(quant_state, rank: int) -> bool:
    out_features, in_features = (int(s) for s in quant_state.shape)
    return (
        widens_nf4(quant_state) and in_features > 0 and rank <= LORA_INSIDE_GEMM_MAX_RANK
        and out_features >= LORA_INSIDE_GEMM_MIN_WIDENING * in_features
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
    """Forward and backward of the QLoRA linear on 2-D inputs; W frozen, all tensors in one dtype.

    `scaling` is applied to the tokens x r intermediates only, never to a full-size tensor.
    """

    @staticmethod
    def forward(ctx, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias):
        beside = _Beside(x.device)
        if _lora_inside_gemm(quant_state, lora_A.shape[0]):
            out, x_a = _forward_lora_inside_gemm(beside, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias)
        else:
            out, x_a = _forward_lora_before_gemm(beside, x, weight4bit, quant_state, lora_A, lora_B, scaling, bias)
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
