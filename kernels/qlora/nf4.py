"""Dequantization of bitsandbytes NF4 weights: the [out, in] weight bit for bit as ``dequantize_4bit`` gives it
(double-quantized block scales included), or widened to ``[W | B | 0]`` for the QLoRA forward's single GEMM;
and ``dequantize_nf4_reference``, the same by plain indexing."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._rounding import multiply_unfused, round_to_nearest

# bitsandbytes stores a weight as ceil(n/2) bytes of the flattened row-major [out, in] weight,
# element 2i in the high nibble of byte i and element 2i+1 in the low nibble.
# 4096 elements and 4 warps a program: ~2.4 TB/s on an H100 (2-8 warps, 1-8K elements within 5%).
_DEQUANT_ELEMENTS_PER_PROGRAM = 4096
_DEQUANT_WARPS = 4


def storage_tensors(quant_state, device: torch.device):  # noqa: ANN001, ANN201
    """``(code, absmax, nested)`` of an NF4 ``QuantState`` on ``device``; ``nested`` is ``(absmax2, code2, offset,
    nested_blocksize)`` for double-quantized block scales, else ``None``. What the storage functions take."""
    _check_quant_state(quant_state)
    nested = None
    if quant_state.nested:
        state2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32)
        nested = (_on(state2.absmax, device), _on(state2.code, device), _on(offset, device), state2.blocksize)
    return _on(quant_state.code, device), _on(quant_state.absmax, device), nested


def _absmax_reference(absmax: torch.Tensor, nested) -> torch.Tensor:  # noqa: ANN001
    """fp32 scale of every block, undoing bitsandbytes' double quantization when present."""
    if nested is None:
        return absmax.float()
    absmax2, code2, offset, nested_blocksize = nested
    codes = absmax.long()
    block_of = torch.arange(codes.numel(), device=codes.device) // nested_blocksize
    # Multiply, round to fp32, then add: bitsandbytes does the two in separate steps (no fma).
    return code2.float()[codes] * absmax2.float()[block_of] + offset.float()


def dequantize_nf4_storage_reference(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, nested,  # noqa: ANN001
                                     shape: tuple[int, int], blocksize: int, quant_dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_nf4_reference`` from the storage tensors (see ``storage_tensors``)."""
    numel = _numel(shape)
    raw = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[:numel].long()
    scale = _absmax_reference(absmax, nested).repeat_interleave(blocksize)[:numel]
    return (code.float()[nibbles] * scale).to(quant_dtype).reshape(shape)


def dequantize_nf4_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:  # noqa: ANN001
    """The [out, in] weight in ``quant_state.dtype``, by plain indexing (same bits as bitsandbytes)."""
    return dequantize_nf4_storage_reference(packed, *storage_tensors(quant_state, packed.device),
                                            tuple(int(s) for s in quant_state.shape), quant_state.blocksize,
                                            quant_state.dtype)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


@triton.jit
def _block_absmax(
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, block_mask, NESTED: tl.constexpr, NESTED_BS: tl.constexpr
):
    if NESTED:
        absmax_code = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blocks // NESTED_BS, mask=block_mask, other=0.0).to(tl.float32)
        value = tl.load(code2_ptr + absmax_code, mask=block_mask, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr).to(tl.float32)
        return multiply_unfused(value, scale2) + offset  # rounded, then added: bitsandbytes' two steps
    else:
        return tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0).to(tl.float32)


@triton.jit
def _dequantize_widened_kernel(
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
    RANK: tl.constexpr,
    PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < weight_programs:
        _dequantize_blocks(
            packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel, in_features,
            out_row_length, pid, BLOCKSIZE, BLOCKS_PER_PROGRAM, NESTED, NESTED_BS, QUANT_DTYPE, True,
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


@triton.jit
def _dequantize_nf4_plain_kernel(
    packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
    QUANT_DTYPE: tl.constexpr,
):
    # The [out, in] weight alone, with no more arguments than it reads: each one costs every launch host time.
    _dequantize_blocks(
        packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel, 0, 0,
        tl.program_id(0), BLOCKSIZE, BLOCKS_PER_PROGRAM, NESTED, NESTED_BS, QUANT_DTYPE, False,
    )


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
    return dequantize_nf4_storage(packed.reshape(-1).view(torch.uint8), *storage_tensors(quant_state, packed.device),
                                  tuple(int(s) for s in quant_state.shape), quant_state.blocksize, quant_state.dtype,
                                  dtype or quant_state.dtype)


def dequantize_nf4_widened(packed: torch.Tensor, quant_state, right: torch.Tensor, width: int) -> torch.Tensor:
    """``[W | right | 0]`` [out, width] in ``right``'s dtype: the NF4 weight as ``dequantize_nf4`` gives it, then
    ``right`` [out, r] (LoRA's B), then zeros. The weight's rows must be whole quantization blocks
    (``widens_nf4``)."""
    out_features, in_features = (int(s) for s in quant_state.shape)
    if not widens_nf4(quant_state):
        raise ValueError(f"rows of {in_features} are not whole blocks of {quant_state.blocksize}")
    if right.shape[0] != out_features or width < in_features + right.shape[1]:
        raise ValueError(f"right {tuple(right.shape)} and width {width} do not fit a [{out_features}, {in_features}] weight")
    return _dequantize_widened(packed, quant_state, right, width)


def widens_nf4(quant_state) -> bool:
    """Whether ``dequantize_nf4_widened`` takes this weight: its rows are whole quantization blocks."""
    return int(quant_state.shape[1]) % quant_state.blocksize == 0


def _dequantize_widened(packed, quant_state, right, width) -> torch.Tensor:  # noqa: ANN001
    device = packed.device
    code, absmax, nested = storage_tensors(quant_state, device)
    numel = _numel(quant_state.shape)
    out_features, in_features = (int(s) for s in quant_state.shape)
    out = torch.empty((out_features, width), dtype=right.dtype, device=device)
    rank = right.shape[1]
    if numel == 0:  # no weight columns: just [right | 0]
        out.zero_()[:, in_features:in_features + rank] = right
        return out
    absmax2, code2, offset, nested_bs = nested if nested is not None else (absmax, absmax, absmax, 1)  # unused
    blocksize = quant_state.blocksize
    blocks_per_program = max(1, _DEQUANT_ELEMENTS_PER_PROGRAM // blocksize)
    weight_programs = -(-numel // (blocksize * blocks_per_program))
    # One more program per `blocks_per_program` rows, for the columns after the weight's.
    tail_programs = -(-out_features // blocks_per_program)
    _dequantize_widened_kernel[(weight_programs + tail_programs,)](
        packed.reshape(-1).view(torch.uint8), code, absmax, absmax2, code2, offset, out, numel, weight_programs, right,
        in_features, width, out_features, rank, right.stride(0), right.stride(1),
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=nested is not None,
        NESTED_BS=nested_bs,
        QUANT_DTYPE=_TL_DTYPES[quant_state.dtype],
        RANK=max(1, triton.next_power_of_2(rank)),
        PAD=triton.next_power_of_2(max(1, width - in_features - rank)),
        num_warps=_DEQUANT_WARPS,
    )
    return out


def _launch_directly(kernel):  # noqa: ANN001, ANN202
    return kernel


def dequantize_nf4_storage(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, nested,  # noqa: ANN001
                           shape: tuple[int, int], blocksize: int, quant_dtype: torch.dtype,
                           dtype: torch.dtype, wrap_kernel=_launch_directly) -> torch.Tensor:  # noqa: ANN001
    """``dequantize_nf4`` from the storage tensors (``storage_tensors``), all on ``packed``'s device, with as little
    host work as a launch allows. ``wrap_kernel`` is what the kernel is launched through:
    ``torch.library.wrap_triton`` lets a compiled program launch it itself."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = shape[0] * shape[1]
    if numel == 0:
        return out
    blocks_per_program = max(1, _DEQUANT_ELEMENTS_PER_PROGRAM // blocksize)
    if nested is None:
        absmax2 = code2 = offset = absmax
        nested_blocksize = 1
    else:
        absmax2, code2, offset, nested_blocksize = nested
    wrap_kernel(_dequantize_nf4_plain_kernel)[(-(-numel // (blocksize * blocks_per_program)),)](
        packed, code, absmax, absmax2, code2, offset, out, numel,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program, NESTED=nested is not None,
        NESTED_BS=nested_blocksize, QUANT_DTYPE=_TL_DTYPES[quant_dtype], num_warps=_DEQUANT_WARPS,
    )
    return out
