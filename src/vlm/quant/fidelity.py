"""How close a quantized model's predictions stay to the 16-bit model's.

Two numbers on held-out batches, over the token positions that matter (by default those with a
label): the mean KL divergence KL(p_16bit || p_quantized) of the next-token distributions, in
nats, and how often both models rank the same token first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = Any
Forward = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) → logits [..., vocab]
Positions = Callable[[Batch], torch.Tensor]  # batch → bool mask over the logits' leading dims

# Rows of logits handled at a time: a 128k vocabulary in fp32 is 0.5 MB a row.
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Fidelity:
    kl: float  # mean over tokens, nats
    top1_agreement: float  # fraction of tokens whose most likely next token is the same
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"kl": self.kl, "top1_agreement": self.top1_agreement, "tokens": self.tokens}


@torch.no_grad()
def reference_log_probs(
    model: nn.Module, batches: Sequence[Batch], forward: Forward, positions: Positions
) -> list[torch.Tensor]:
    """The model's log-probabilities at the chosen positions of each batch, fp32, kept on the CPU."""
    return [_selected_log_probs(forward(model, batch), positions(batch)).cpu() for batch in batches]


@torch.no_grad()
def fidelity(
    model: nn.Module,
    batches: Sequence[Batch],
    forward: Forward,
    positions: Positions,
    reference: Sequence[torch.Tensor],
) -> Fidelity:
    """KL and top-1 agreement of ``model`` against ``reference`` (from :func:`reference_log_probs`)."""
    kl_sum, agree, tokens = 0.0, 0, 0
    for batch, ref in zip(batches, reference, strict=True):
        logits = forward(model, batch)
        mask = positions(batch).to(logits.device)
        rows = logits[mask]
        if rows.shape[0] != ref.shape[0]:
            raise ValueError(f"{rows.shape[0]} positions selected but the reference has {ref.shape[0]}")
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            q = torch.log_softmax(rows[start : start + CHUNK_ROWS].float(), dim=-1)
            p = ref[start : start + CHUNK_ROWS].to(q.device)
            kl_sum += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += rows.shape[0]
    if tokens == 0:
        raise ValueError("no positions to compare: every selected mask is empty")
    return Fidelity(kl=kl_sum / tokens, top1_agreement=agree / tokens, tokens=tokens)


def _selected_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = logits[mask.to(logits.device)]
    return torch.cat(
        [torch.log_softmax(rows[s : s + CHUNK_ROWS].float(), dim=-1) for s in range(0, rows.shape[0], CHUNK_ROWS)]
    ) if rows.shape[0] else rows.float()
