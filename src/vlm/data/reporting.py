"""The skip counts of a run, reported: one log line per training epoch and validation run, and metrics.

Add :class:`SkipReport` to the Trainer's callbacks (``callbacks.skip_report: {_target_:
vlm.data.reporting.SkipReport}``); it reads :attr:`~vlm.data.datamodule.ShardDataModule.skipped`
and ``delivered`` of the Trainer's data module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L

log = logging.getLogger("vlm.data")

METRIC_PREFIX = "data/skipped/"


def skip_summary(skipped: Mapping[str, int], delivered: int) -> str:
    """One line: how many samples were delivered and skipped, and the skips per reason, most frequent first."""
    total = sum(skipped.values())
    if not total:
        return f"data: {delivered} samples read, none skipped"
    share = total / (total + delivered)
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda item: (-item[1], item[0])))
    return f"data: {delivered} samples read, {total} skipped ({share:.1%}): {reasons}"


def skip_metrics(skipped: Mapping[str, int]) -> dict[str, float]:
    """``data/skipped/<reason>`` (spaces as underscores) → count, for the loggers."""
    return {METRIC_PREFIX + reason.replace(" ", "_"): float(n) for reason, n in skipped.items()}


class SkipReport(L.Callback):
    """Logs the data module's skip counts (logger ``vlm.data``: WARNING once anything was skipped,
    else DEBUG) at the end of every training epoch and validation run, and logs them as metrics
    ``data/skipped/<reason>`` (counts since the run started). Does nothing for a data module
    without ``skipped``."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, f"training epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "validation")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, after: str) -> None:
        data: Any = getattr(trainer, "datamodule", None)
        skipped = getattr(data, "skipped", None)
        if skipped is None:
            return
        # Only what was skipped is news: a clean report would add a line to every validation.
        level = logging.WARNING if sum(skipped.values()) else logging.DEBUG
        log.log(level, "after %s, %s", after, skip_summary(skipped, getattr(data, "delivered", 0)))
        metrics = skip_metrics(skipped)
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, reduce_fx="max")


__all__ = ["METRIC_PREFIX", "SkipReport", "skip_metrics", "skip_summary"]
