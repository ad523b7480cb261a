"""One progress bar for a run: optimizer steps out of ``max_steps``, the latest losses, the time left.

Lightning's bars count batches per epoch, which a streamed data set does not have (``Epoch 0/-2``,
``8/--``), and open one more bar for every validation. This one counts the steps the run is
asked for and shows validation as a phase of the same bar. In a terminal it redraws in place;
written to a file or a pipe it prints a line every tenth of the run instead.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks.progress import ProgressBar

# Reading a loss off the GPU waits for the step: the bar reads at most this often.
REFRESH_S = 0.5


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) else None


class StepProgressBar(ProgressBar):
    """Training progress in optimizer steps, with ``train/loss`` and ``val/loss`` beside it."""

    def __init__(self, train_metric: str = "train/loss", val_metric: str = "val/loss", console: Any = None) -> None:
        super().__init__()
        self.train_metric, self.val_metric = train_metric, val_metric
        self._console = console
        self._enabled = True
        self._progress: Any = None
        self._task: Any = None
        self._total = 0
        self._last_read = 0.0
        self._next_line_step = 0
        self._started = 0.0
        self._losses: dict[str, float | None] = {"loss": None, "val": None}

    # ---- ProgressBar API
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    # ---- what is shown
    def _console_or_default(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def _status(self) -> str:
        parts = [f"{name} {value:.4g}" for name, value in self._losses.items() if value is not None]
        return " · ".join(parts)

    def _read(self, trainer: lightning.Trainer) -> None:
        metrics = trainer.callback_metrics
        for name, key in (("loss", self.train_metric), ("val", self.val_metric)):
            if key in metrics:
                self._losses[name] = _number(metrics[key])

    def _line(self, step: int, phase: str = "") -> None:
        elapsed = time.perf_counter() - self._started
        status = self._status()
        text = f"step {step}/{self._total}" + (f" · {status}" if status else "") + f" · {elapsed:.1f} s" + phase
        self._console_or_default().print(text, highlight=False)

    # ---- hooks
    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._total = int(total) if math.isfinite(total) else 0
        self._started = time.perf_counter()
        console = self._console_or_default()
        self._next_line_step = trainer.global_step + max(1, self._total // 10)
        if not console.is_terminal:
            return
        from rich import progress as bars

        self._progress = bars.Progress(
            bars.TextColumn("{task.description:<10}"),
            bars.BarColumn(),
            bars.MofNCompleteColumn(),
            bars.TextColumn("steps"),
            bars.TimeElapsedColumn(),
            bars.TextColumn("<"),
            bars.TimeRemainingColumn(),
            bars.TextColumn("{task.fields[status]}"),
            console=console,
        )
        self._progress.start()
        self._task = self._progress.add_task("training", total=self._total or None, completed=trainer.global_step, status="")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if not self._enabled or not trainer.is_global_zero or not self._total:
            return
        step = trainer.global_step
        now = time.perf_counter()
        if self._progress is not None:
            if now - self._last_read >= REFRESH_S or step >= self._total:
                self._read(trainer)
                self._last_read = now
            self._progress.update(self._task, completed=step, status=self._status())
        elif step >= self._next_line_step or step >= self._total:
            self._read(trainer)
            self._line(step)
            self._next_line_step = step + max(1, self._total // 10)

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self._progress is not None and not trainer.sanity_checking:
            self._progress.update(self._task, description="validating")

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._read(trainer)
        if self._progress is not None:
            self._progress.update(self._task, description="training", status=self._status())
        elif self._total and trainer.state.fn == "fit":
            self._line(trainer.global_step, " (validated)")

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self._progress is not None:
            self._read(trainer)
            self._progress.update(self._task, completed=trainer.global_step, status=self._status())
            self._progress.stop()
            self._progress = None

    def on_exception(self, trainer, pl_module, exception) -> None:  # noqa: ANN001
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
