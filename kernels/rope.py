"""Rotary position embeddings (Hugging Face Llama RoPE and Qwen2-VL multimodal RoPE) applied to q and k
in one Triton launch, forward and backward: q and k are read and written once, cos/sin are read once per
tile of positions and group of heads, and mrope's per-section stream choice is an index, not a torch.cat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._settings import require_at_least, require_power_of_two


@dataclass(frozen=True)
class RopeTiling:
    """How the rotation is split over programs: a tile of positions x half head_dim for a few heads each."""

    # Positions x half head_dim of a program's tile (a power of two, so the positions of a tile are one too).
    tile_elements: int = 1024
    # Heads one program rotates: they share its cos/sin loads.
    heads_per_program: int = 4
    num_warps: int = 4

    def __post_init__(self) -> None:
        require_power_of_two(self, "tile_elements", "num_warps")
        require_at_least(self, 1, "heads_per_program")


DEFAULT_ROPE_TILING = RopeTiling()


# --------------------------------------------------------------------------- reference (Hugging Face semantics)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` (unsqueeze_dim=1): q, k [B, H, S, D]; cos, sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def select_mrope_sections(freq: torch.Tensor, mrope_section) -> torch.Tensor:
    """[3, B, S, D] -> [B, S, D]: section i of each half of head_dim comes from stream i % 3 (HF's recomposition)."""
    sections = list(mrope_section) * 2
    return torch.cat([part[i % 3] for i, part in enumerate(freq.split(sections, dim=-1))], dim=-1)


def apply_multimodal_rotary_reference(q, k, cos, sin, mrope_section):
    """Qwen2-VL's ``apply_multimodal_rotary_pos_emb``: cos, sin [3, B, S, D] (temporal, height, width)."""
    return apply_rotary_reference(q, k, select_mrope_sections(cos, mrope_section), select_mrope_sections(sin, mrope_section))


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, first_head, n_heads, rows, cols, tile_mask, half_dim,
    x_stride_h, x_stride_s, out_stride_h, out_stride_s,
    c1, c2, sa, sb,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    x_offsets = rows[:, None] * x_stride_s + cols[None, :]
    out_offsets = rows[:, None] * out_stride_s + cols[None, :]
    for i in tl.static_range(HEADS_PER_PROGRAM):
        head = first_head + i
        # a block-shaped head test: the interpreter rejects a scalar bool and-ed into a mask
        mask = tile_mask & ((rows[:, None] * 0 + head) < n_heads)
        x_head = x_ptr + head * x_stride_h
        x1 = tl.load(x_head + x_offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + x_offsets + half_dim, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c1 - x2 * sa
        out2 = x2 * c2 + x1 * sb
        out_head = out_ptr + head * out_stride_h
        tl.store(out_head + out_offsets, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_head + out_offsets + half_dim, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    seq_len, half_dim, q_heads, k_heads, q_groups, section_1_end, section_2_end,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    q_out_stride_b, q_out_stride_h, q_out_stride_s,
    k_out_stride_b, k_out_stride_h, k_out_stride_s,
    cs_stride_stream, cs_stride_b, cs_stride_s,
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    # grid: (position tiles, q head groups + k head groups, batch); int64 so batch*stride cannot overflow.
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    group = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    tile_mask = (rows[:, None] < seq_len) & (cols[None, :] < half_dim)

    # mrope: column j (and j + D/2) reads the stream whose section holds j; standard RoPE has one stream.
    stream = (cols >= section_1_end).to(tl.int32) + (cols >= section_2_end).to(tl.int32)
    cs_offsets = batch * cs_stride_b + rows[:, None] * cs_stride_s + stream[None, :] * cs_stride_stream + cols[None, :]
    c1 = tl.load(cos_ptr + cs_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs_offsets + half_dim, mask=tile_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs_offsets + half_dim, mask=tile_mask, other=0.0).to(tl.float32)
    # forward: out1 = x1*c1 - x2*s1, out2 = x2*c2 + x1*s2; backward is its transpose (rotation by -angle).
    if BACKWARD:
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2

    if group < q_groups:
        _rotate_heads(
            q_ptr + batch * q_stride_b, q_out_ptr + batch * q_out_stride_b, group * HEADS_PER_PROGRAM, q_heads,
            rows, cols, tile_mask, half_dim, q_stride_h, q_stride_s, q_out_stride_h, q_out_stride_s,
            c1, c2, sa, sb, HEADS_PER_PROGRAM,
        )
    else:
        _rotate_heads(
            k_ptr + batch * k_stride_b, k_out_ptr + batch * k_out_stride_b, (group - q_groups) * HEADS_PER_PROGRAM,
            k_heads, rows, cols, tile_mask, half_dim, k_stride_h, k_stride_s, k_out_stride_h, k_out_stride_s,
            c1, c2, sa, sb, HEADS_PER_PROGRAM,
        )


# --------------------------------------------------------------------------- launch


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_shapes(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if q.shape[-1] % 2:
        raise ValueError(f"head_dim must be even, got {q.shape[-1]}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")


def _rotate(q, k, cos, sin, sections, tiling: RopeTiling, backward: bool):
    """cos, sin: [streams, B, S, D] with the batch dim possibly broadcast; sections: ends of streams 0 and 1."""
    batch, q_heads, seq_len, head_dim = q.shape
    k_heads = k.shape[1]
    half_dim = head_dim // 2
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cos = _unit_last_stride(cos).expand(cos.shape[0], batch, seq_len, head_dim)
    sin = _unit_last_stride(sin).expand(cos.shape)
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return q_out, k_out

    block_half = triton.next_power_of_2(half_dim)
    block_s = min(triton.next_power_of_2(seq_len), max(1, tiling.tile_elements // block_half))
    heads_per_program = tiling.heads_per_program
    q_groups = triton.cdiv(q_heads, heads_per_program)
    grid = (triton.cdiv(seq_len, block_s), q_groups + triton.cdiv(k_heads, heads_per_program), batch)
    _rope_kernel[grid](
        q, k, q_out, k_out, cos, sin,
        seq_len, half_dim, q_heads, k_heads, q_groups, sections[0], sections[1],
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), cos.stride(2),
        BACKWARD=backward, BLOCK_S=block_s, BLOCK_HALF=block_half, HEADS_PER_PROGRAM=heads_per_program,
        num_warps=tiling.num_warps,
    )
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    """Rotates q and k; gradients flow to q and k only (cos/sin come from position ids)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, sections, tiling: RopeTiling):
        ctx.save_for_backward(cos, sin)
        ctx.sections, ctx.tiling = sections, tiling
        return _rotate(q, k, cos, sin, sections, tiling, backward=False)

    @staticmethod
    def backward(ctx, grad_q_out, grad_k_out):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = _rotate(grad_q_out, grad_k_out, cos, sin, ctx.sections, ctx.tiling, backward=True)
        return grad_q, grad_k, None, None, None, None


# --------------------------------------------------------------------------- public API


def apply_rotary(q, k, cos, sin, *, tiling: RopeTiling = DEFAULT_ROPE_TILING):
    """HF ``apply_rotary_pos_emb``: q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D] -> (q_out, k_out).
    ``tiling`` chooses how the work is split over programs (not the result)."""
    _check_shapes(q, k, cos, sin)
    half_dim = q.shape[-1] // 2
    return RotaryFunction.apply(q, k, cos.unsqueeze(0), sin.unsqueeze(0), (half_dim, half_dim), tiling)


def apply_multimodal_rotary(q, k, cos, sin, mrope_section, *, tiling: RopeTiling = DEFAULT_ROPE_TILING):
    """Qwen2-VL mrope: cos/sin [3, B or 1, S, D], ``mrope_section`` = 3 ints summing to D/2 -> (q_out, k_out)."""
    _check_shapes(q, k, cos, sin)
    if len(mrope_section) != 3 or sum(mrope_section) != q.shape[-1] // 2 or cos.shape[0] != 3:
        raise ValueError(f"mrope_section {list(mrope_section)} must be 3 ints summing to head_dim/2 with cos [3, ...]")
    sections = (mrope_section[0], mrope_section[0] + mrope_section[1])
    return RotaryFunction.apply(q, k, cos, sin, sections, tiling)
