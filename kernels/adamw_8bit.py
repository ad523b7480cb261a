"""One AdamW step over a flat buffer of parameters with 8-bit blockwise states, in one launch.

The states are kept as bitsandbytes keeps them: each block of ``STATE_BLOCK`` values is stored as one byte a
value, an index into a sorted 256-value map (``maps``: bitsandbytes' signed dynamic map for the first moment,
its unsigned one for the second), times the block's absolute maximum. bitsandbytes' optimizer runs one launch per tensor and waits
for the device after each: over the 560 LoRA tensors of an 11B model that is ~50 ms of a ~0.6 s step, most of
it the device idling. Here every tensor of a parameter group is one flat buffer, and the whole step one launch.

``adamw_8bit_step`` updates ``param`` and the states in place; ``adamw_8bit_step_reference`` is the same step in
PyTorch (fp32, IEEE rounding, no fused multiply-add), bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATE_BLOCK = 256  # values sharing one absolute maximum
_BLOCKS_PER_PROGRAM = 4
_MAP_SIZE = 256


@triton.jit
def _nearest_code(table_ptr, x, MAP_SIZE: tl.constexpr, MAP_BITS: tl.constexpr):
    """Index of the value of the sorted ``table`` nearest to each ``x`` (ties to the lower)."""
    low = tl.zeros(x.shape, dtype=tl.int32)
    for halving in tl.static_range(MAP_BITS):  # the last index whose value is <= x (index 0 when none is)
        candidate = low + (MAP_SIZE >> (halving + 1))
        low = tl.where(tl.load(table_ptr + candidate) <= x, candidate, low)
    high = tl.minimum(low + 1, MAP_SIZE - 1)
    below, above = tl.load(table_ptr + low), tl.load(table_ptr + high)
    return tl.where(above - x < x - below, high, low)


@triton.jit
def _adamw_8bit_kernel(
    param_ptr, grad_ptr, m_codes_ptr, v_codes_ptr, m_absmax_ptr, v_absmax_ptr, active_ptr, signed_map_ptr,
    unsigned_map_ptr, numel, hyper_ptr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, MAP_SIZE: tl.constexpr,
    MAP_BITS: tl.constexpr,
):
    # The step's scalars, read from a device tensor: fp32 as the reference rounds them, on the GPU and in the
    # interpreter alike (which would hold float arguments in double precision).
    lr, beta1, one_minus_beta1 = tl.load(hyper_ptr), tl.load(hyper_ptr + 1), tl.load(hyper_ptr + 2)
    beta2, one_minus_beta2, eps = tl.load(hyper_ptr + 3), tl.load(hyper_ptr + 4), tl.load(hyper_ptr + 5)
    decay, bias_correction1, bias_correction2_sqrt = tl.load(hyper_ptr + 6), tl.load(hyper_ptr + 7), tl.load(hyper_ptr + 8)
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    in_range = blocks * BLOCK < numel
    block_ok = in_range & (tl.load(active_ptr + blocks, mask=in_range, other=0) != 0)
    mask = block_ok[:, None] & (offsets < numel)

    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0)
    m_scale = tl.load(m_absmax_ptr + blocks, mask=block_ok, other=0.0)
    v_scale = tl.load(v_absmax_ptr + blocks, mask=block_ok, other=0.0)
    m = tl.load(signed_map_ptr + tl.load(m_codes_ptr + offsets, mask=mask, other=0).to(tl.int32)) * m_scale[:, None]
    v = tl.load(unsigned_map_ptr + tl.load(v_codes_ptr + offsets, mask=mask, other=0).to(tl.int32)) * v_scale[:, None]

    m = beta1 * m + one_minus_beta1 * grad
    v = beta2 * v + one_minus_beta2 * (grad * grad)
    denominator = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    param = param * decay - lr * tl.div_rn(tl.div_rn(m, bias_correction1), denominator)
    tl.store(param_ptr + offsets, param, mask=mask)

    # Requantize against the block's new maxima.
    m_max = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
    v_max = tl.max(tl.where(mask, v, 0.0), axis=1)
    tl.store(m_absmax_ptr + blocks, m_max, mask=block_ok)
    tl.store(v_absmax_ptr + blocks, v_max, mask=block_ok)
    m_unit = tl.div_rn(m, tl.where(m_max > 0, m_max, 1.0)[:, None])
    v_unit = tl.div_rn(v, tl.where(v_max > 0, v_max, 1.0)[:, None])
    tl.store(m_codes_ptr + offsets, _nearest_code(signed_map_ptr, m_unit, MAP_SIZE, MAP_BITS).to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offsets, _nearest_code(unsigned_map_ptr, v_unit, MAP_SIZE, MAP_BITS).to(tl.uint8), mask=mask)


def state_blocks(numel: int) -> int:
    return -(-numel // STATE_BLOCK)


def _check(param, grad, m_codes, v_codes, m_absmax, v_absmax, active) -> None:  # noqa: ANN001
    numel, blocks = param.numel(), state_blocks(param.numel())
    if param.dtype != torch.float32 or param.dim() != 1 or not param.is_contiguous():
        raise ValueError("param must be a contiguous 1-D fp32 tensor")
    if grad.shape != param.shape or m_codes.shape != param.shape or v_codes.shape != param.shape:
        raise ValueError("grad and the codes must have param's shape")
    if m_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise ValueError("the codes are uint8")
    if m_absmax.shape != (blocks,) or v_absmax.shape != (blocks,) or active.shape != (blocks,):
        raise ValueError(f"the block maxima and the active flags have one entry per block of {STATE_BLOCK}: {blocks}")
    if numel == 0:
        raise ValueError("nothing to update")


def adamw_8bit_step(param, grad, m_codes, v_codes, m_absmax, v_absmax, active, maps, *, lr: float,  # noqa: ANN001
                    betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> None:
    """AdamW step ``step`` (1 the first) of the blocks flagged ``active`` (uint8, one per block), in place."""
    _check(param, grad, m_codes, v_codes, m_absmax, v_absmax, active)
    grid = (-(-state_blocks(param.numel()) // _BLOCKS_PER_PROGRAM),)
    _adamw_8bit_kernel[grid](
        param, grad, m_codes, v_codes, m_absmax, v_absmax, active, maps[0], maps[1], param.numel(),
        _step_scalars(lr, betas, eps, weight_decay, step, param.device), BLOCK=STATE_BLOCK, BLOCKS_PER_PROGRAM=_BLOCKS_PER_PROGRAM, MAP_SIZE=_MAP_SIZE,
        MAP_BITS=_MAP_SIZE.bit_length() - 1,
        enable_fp_fusion=False,  # rounds as the reference does
    )


def _step_scalars(lr, betas, eps, weight_decay, step, device) -> torch.Tensor:  # noqa: ANN001
    beta1, beta2 = betas
    values = [lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay, 1.0 - beta1**step,
              (1.0 - beta2**step) ** 0.5]
    scalars = torch.tensor(values, dtype=torch.float32)
    if torch.device(device).type != "cuda":
        return scalars
    # From pinned memory, queued: a copy from pageable memory would wait for the device.
    return scalars.pin_memory().to(device, non_blocking=True)


def _nearest_code_reference(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    low = (torch.searchsorted(table, x, right=True) - 1).clamp(min=0)
    high = (low + 1).clamp(max=table.numel() - 1)
    return torch.where(table[high] - x < x - table[low], high, low).to(torch.uint8)


def adamw_8bit_step_reference(param, grad, m_codes, v_codes, m_absmax, v_absmax, active, maps, *, lr: float,  # noqa: ANN001
                              betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> None:
    """``adamw_8bit_step`` in PyTorch, in place."""
    _check(param, grad, m_codes, v_codes, m_absmax, v_absmax, active)
    beta1, beta2 = betas
    signed, unsigned = maps
    blocks = state_blocks(param.numel())
    padded = blocks * STATE_BLOCK

    def blocked(t: torch.Tensor, fill=0) -> torch.Tensor:  # noqa: ANN001
        return torch.nn.functional.pad(t, (0, padded - t.numel()), value=fill).view(blocks, STATE_BLOCK)

    valid = blocked(torch.ones_like(param, dtype=torch.bool), False) & (active != 0)[:, None]
    g = blocked(grad.float())
    m = signed[blocked(m_codes).long()] * m_absmax[:, None]
    v = unsigned[blocked(v_codes).long()] * v_absmax[:, None]
    def fp32(value: float) -> torch.Tensor:  # a scalar rounded to fp32 as a kernel argument is
        return torch.tensor(value, dtype=torch.float32, device=param.device)

    m = fp32(beta1) * m + fp32(1.0 - beta1) * g
    v = fp32(beta2) * v + fp32(1.0 - beta2) * (g * g)
    denominator = v.sqrt() / fp32((1.0 - beta2**step) ** 0.5) + fp32(eps)
    updated = blocked(param) * fp32(1.0 - lr * weight_decay) - fp32(lr) * (m / fp32(1.0 - beta1**step) / denominator)
    m_max = torch.where(valid, m.abs(), 0.0).amax(1)
    v_max = torch.where(valid, v, 0.0).amax(1)
    m_code = _nearest_code_reference(signed, m / torch.where(m_max > 0, m_max, 1.0)[:, None])
    v_code = _nearest_code_reference(unsigned, v / torch.where(v_max > 0, v_max, 1.0)[:, None])

    keep = valid.view(-1)[: param.numel()]
    numel = param.numel()
    param.copy_(torch.where(keep, updated.view(-1)[:numel], param))
    m_codes.copy_(torch.where(keep, m_code.view(-1)[:numel], m_codes))
    v_codes.copy_(torch.where(keep, v_code.view(-1)[:numel], v_codes))
    block_active = active != 0
    m_absmax.copy_(torch.where(block_active, m_max, m_absmax))
    v_absmax.copy_(torch.where(block_active, v_max, v_absmax))
