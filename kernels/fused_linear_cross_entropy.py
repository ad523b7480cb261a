"""Language-model head and cross-entropy loss in one op: ``cross_entropy(hidden @ weight.T + bias, labels)``.

Fused so that the [tokens, vocab] logits never exist whole: tokens are processed in chunks, and for each
chunk the loss and the gradients w.r.t. hidden, weight and bias are computed in the forward pass, after
which the chunk's logits are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_REDUCTIONS = ("mean", "sum")
# Bytes of one chunk's logits: big enough that the chunk matmuls keep cuBLAS busy, small next to the
# full logits (8192 tokens x 128256 words in bf16 are 2 GB, 4 GB once upcast as the reference does).
_GPU_CHUNK_BYTES = 256 * 1024 * 1024
# A trainable head re-reads and re-writes its fp32 gradient accumulator (2 GB for 128256 x 4096) once per
# chunk: twice the rows halve that traffic (on an H100: 51 -> 46 ms for 8192 tokens), for 256 MB more.
_GPU_CHUNK_BYTES_WITH_WEIGHT_GRAD = 512 * 1024 * 1024
_CPU_CHUNK_BYTES = 8 * 1024 * 1024
_MAX_VOCAB_BLOCK = 8192


def _as_tokens(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., H] and labels [...] as [tokens, H] and [tokens], checked to hold as many tokens."""
    hidden_2d, labels_1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if labels_1d.shape[0] != hidden_2d.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    return hidden_2d, labels_1d


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean",
) -> torch.Tensor:
    """Hugging Face's ForCausalLMLoss on already-shifted labels: logits upcast to fp32, then cross-entropy.

    "mean" with every label ignored gives 0 (F.cross_entropy would give NaN).
    """
    hidden, labels = _as_tokens(hidden, labels)
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if reduction == "mean" and not (labels != ignore_index).any():
        reduction = "sum"
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    vocab_size,
    WRITE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: loss = logsumexp(row) - row[label]; optionally row <- softmax(row) - one_hot(label).

    The gradient is left unscaled (entries in [-1, 1]) so that fp16 buffers do not underflow; the caller
    applies the 1/num_valid of a mean to the matmul results.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)

    # Online log-sum-exp: running max m and sum s of exp(x - m), rescaled whenever m grows.
    m = float("-inf")
    s = 0.0
    for start in range(0, vocab_size, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(row_ptr + offsets, mask=offsets < vocab_size, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new

    # Kept apart from m: at logits of 1e3, m + log(s) would round away ~1e-4 of the softmax's precision.
    # An out-of-range label reads NaN instead of another row's memory, so the loss says so.
    label_in_range = (label >= 0) & (label < vocab_size)
    target = tl.load(row_ptr + label, mask=label_in_range, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, (m - target) + tl.log(s))

    if WRITE_GRAD:
        inv_s = 1.0 / s
        for start in range(0, vocab_size, BLOCK_SIZE):
            offsets = start + tl.arange(0, BLOCK_SIZE)
            mask = offsets < vocab_size
            x = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - m) * inv_s - tl.where(offsets == label, 1.0, 0.0)
            tl.store(row_ptr + offsets, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, write_grad: bool) -> None:
    """Writes the fp32 loss of each row of ``logits`` [rows, vocab] (labels all valid) into ``loss``; with
    ``write_grad`` the logits are overwritten in place by the unscaled gradient softmax - one_hot."""
    rows, vocab_size = logits.shape
    if rows == 0:
        return
    block_size = min(triton.next_power_of_2(vocab_size), _MAX_VOCAB_BLOCK)
    _cross_entropy_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss,
        vocab_size,
        WRITE_GRAD=write_grad,
        BLOCK_SIZE=block_size,
        num_warps=8 if block_size >= 4096 else 4,
    )


def _default_chunk_size(vocab_size: int, dtype: torch.dtype, device: torch.device, weight_grad: bool) -> int:
    if device.type != "cuda":
        budget = _CPU_CHUNK_BYTES
    else:
        budget = _GPU_CHUNK_BYTES_WITH_WEIGHT_GRAD if weight_grad else _GPU_CHUNK_BYTES
    rows = budget // (vocab_size * torch.empty((), dtype=dtype).element_size())
    # A multiple of 128 keeps the chunk matmuls on full tensor-core tiles.
    return max(1, rows // 128 * 128 if rows >= 128 else rows)


def _accumulate_grad_weight_(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (fp32 for a bf16/fp16 weight) += grad_logits.T @ hidden, without a [vocab, hidden] temporary."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    elif grad_weight.is_cuda:
        # cuBLAS reads half-precision operands and accumulates into the fp32 output (torch >= 2.9).
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(grad_logits.t().float(), hidden.float())


def _forward_in_chunks(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, needs_grad):
    """Loss and, where ``needs_grad`` = (hidden, weight, bias) asks, the gradients of the loss w.r.t. them
    (for a loss gradient of 1), chunk by chunk over the tokens that are not ignored."""
    want_hidden, want_weight, want_bias = needs_grad
    num_tokens = hidden.shape[0]
    vocab_size = weight.shape[0]
    valid = labels != ignore_index
    num_valid = int(valid.sum())
    if num_valid < num_tokens:
        # Ignored tokens (prompt, image, padding) need no logits at all.
        rows = valid.nonzero().squeeze(1)
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    chunk_size = chunk_size or _default_chunk_size(vocab_size, hidden.dtype, hidden.device, want_weight)
    chunk_size = max(1, min(chunk_size, num_valid))
    accumulate_dtype = torch.promote_types(weight.dtype, torch.float32)

    write_grad = any(needs_grad)
    loss_rows = torch.empty(num_valid, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(vocab_size, dtype=accumulate_dtype, device=weight.device) if want_bias else None
    logits_buffer = torch.empty(chunk_size, vocab_size, dtype=hidden.dtype, device=hidden.device)

    for start in range(0, num_valid, chunk_size):
        end = min(start + chunk_size, num_valid)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(hidden_chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden_chunk, weight.t(), out=logits)
        cross_entropy_rows_(logits, labels[start:end], loss_rows[start:end], write_grad)
        if want_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if want_weight:
            _accumulate_grad_weight_(grad_weight, logits, hidden_chunk)
        if want_bias:
            grad_bias += logits.sum(0, dtype=accumulate_dtype)
    del logits_buffer

    scale = 1.0 / max(num_valid, 1) if reduction == "mean" else 1.0
    loss = loss_rows.sum() * scale
    if grad_hidden is not None:
        grad_hidden.mul_(scale)
        if num_valid < num_tokens:
            grad_hidden = torch.zeros(num_tokens, hidden.shape[1], dtype=hidden.dtype, device=hidden.device).index_copy_(
                0, rows, grad_hidden
            )
    if grad_weight is not None:
        grad_weight = grad_weight.mul_(scale).to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.mul_(scale).to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients are computed in forward (the chunk logits are gone by backward), which only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, chunk_size):
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        loss, grad_hidden, grad_weight, grad_bias = _forward_in_chunks(
            hidden, weight, labels, bias, ignore_index, reduction, chunk_size, needs_grad
        )
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy supports one backward per forward (no retain_graph)")
        # Scaled in place: a copy of a [vocab, hidden] gradient would cost as much as the weight again.
        grads = tuple(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, None, grad_bias, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
) -> torch.Tensor:
    """fp32 cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (already shifted) without
    materializing the logits. hidden [..., H], weight [V, H], labels [...] (int64), bias [V] or None;
    reduction "mean" (over tokens whose label is not ``ignore_index``; 0 when there are none) or "sum".
    ``chunk_size`` = tokens per chunk (default: 256 MB of logits on GPU, 512 MB when the weight needs a
    gradient, 8 MB on CPU)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    hidden_2d, labels_1d = (t.contiguous() for t in _as_tokens(hidden, labels))
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not torch.is_grad_enabled():
        no_grads = (False, False, False)
        return _forward_in_chunks(hidden_2d, weight, labels_1d, bias, ignore_index, reduction, chunk_size, no_grads)[0]
    return FusedLinearCrossEntropyFunction.apply(
        hidden_2d, weight, labels_1d, bias, ignore_index, reduction, chunk_size
    )
