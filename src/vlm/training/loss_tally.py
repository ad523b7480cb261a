"""The validation loss as training reports it: a token-weighted mean of batch losses.

Validation and ``vlm-eval`` both sum through :class:`LossTally`, so a run's evaluated loss is its
validation loss by construction.
"""

from __future__ import annotations

import math

import torch

from vlm.data.encoding import IGNORE_INDEX


def supervised_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens a causal-LM loss averages over: ``labels != -100`` after the one-token shift."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


class LossTally:
    """The token-weighted sum of batch losses and the token count, summed in float64 on the device
    (no host sync per batch); a batch without supervised tokens (loss NaN, 0/0) adds nothing."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, labels: torch.Tensor) -> None:
        loss = loss.detach().float()
        count = supervised_token_count(labels).to(loss.device)
        weighted = torch.where(count > 0, loss * count, torch.zeros_like(loss))
        if self.total is None:
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64
            self.total = torch.zeros((), dtype=dtype, device=loss.device)
            self.count = torch.zeros((), dtype=dtype, device=loss.device)
        self.total += weighted.to(self.total.dtype)
        self.count += count.to(self.count.dtype)

    @property
    def tokens(self) -> int:
        return int(self.count.item()) if self.count is not None else 0

    @property
    def mean(self) -> float:
        return float((self.total / self.count).item()) if self.tokens else math.nan
