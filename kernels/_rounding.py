"""Rounding that gives the GPU's bits also in Triton's CPU interpreter."""

import os

import triton
import triton.language as tl

# Triton decides the same way, when a kernel is decorated, whether it runs in its CPU interpreter.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to_nearest(value, DTYPE: tl.constexpr):
    """fp32 ``value`` rounded to nearest-even in ``DTYPE``, still held in fp32 (a later cast is exact).

    GPUs round on fp32 → bf16 casts (and the compiler folds the round trip into the final cast); Triton's
    CPU interpreter truncates, so there bf16 is rounded by hand, giving the GPU's bits.
    """
    if DTYPE == tl.bfloat16 and INTERPRETED:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.bfloat16 or DTYPE == tl.float16:
        return value.to(DTYPE).to(tl.float32)
    else:
        return value


@triton.jit
def multiply_unfused(a, b):
    """fp32 ``a * b`` rounded to fp32 on its own, never contracted with a following add into an fma.

    A kernel that ``torch.compile`` launches is compiled with fp fusion on, so a product that must round before
    its sum (as bitsandbytes' separate steps do) says so in the instruction itself.
    """
    if INTERPRETED:  # numpy never fuses
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
