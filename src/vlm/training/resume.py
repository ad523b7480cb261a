"""What makes a resumed run continue exactly where it stopped, and only from a checkpoint of its own build.

* :class:`RngState` puts the Python, NumPy and torch random states into each checkpoint and sets
  them back when training resumes, right before the first resumed step.
* :func:`describe_differences` says how a checkpoint's build differs from this run's (the module
  refuses such a checkpoint, see :class:`vlm.training.module.VisionLanguageFineTuner`).
* :class:`SaveOnSignal` answers SIGTERM and SIGUSR1 (a scheduler's pre-emption warning, as on
  SLURM) with a checkpoint at the end of the current step, then stops the run.

The optimizer, the schedule, the global step and the data position (see
:class:`vlm.data.datamodule.ShardDataModule`) are restored by Lightning itself.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch

log = logging.getLogger(__name__)


class RngState(lightning.Callback):
    """Random states in the checkpoint, as plain data (``torch.load(weights_only=True)`` takes it).

    They are set back right before the first resumed step: creating the data iterator draws from
    torch's generator, which an uninterrupted run did once at its start and not again there. And
    a validation inside training leaves the random states as the step before it left them (its
    loader draws a seed too), so a run resumed from the checkpoint of that step, which does not
    repeat the validation, goes on with the same random numbers.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._after_step: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return _rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._after_step = _rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._after_step is not None:
            _set_rng_states(self._after_step)


def _rng_states() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": _lists(random.getstate()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "position": position, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """``key: saved → current`` for every key whose values differ, or '' when none does."""
    keys = sorted(set(saved) | set(current))
    return "; ".join(f"{k}: {_short(saved.get(k))} in the checkpoint, {_short(current.get(k))} now"
                     for k in keys if saved.get(k) != current.get(k))


class SaveOnSignal(lightning.Callback):
    """On SIGTERM or SIGUSR1: a checkpoint at ``dirpath/filename`` once the current step ends, then stop.

    Lightning notes SIGTERM itself and ends the run with ``SIGTERMException`` after the step's
    callbacks; this callback writes the checkpoint first. SIGUSR1 is handled here where nothing
    else (Lightning's SLURM requeue) handles it, and stops the run the same way.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._usr1 = False

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: ANN001
        if stage == "fit" and hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, self._note_usr1)

    def teardown(self, trainer, pl_module, stage: str) -> None:  # noqa: ANN001
        if stage == "fit" and hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) == self._note_usr1:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def _note_usr1(self, signum, frame) -> None:  # noqa: ANN001
        self._usr1 = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if not (trainer.received_sigterm or self._usr1):
            return
        trainer.save_checkpoint(self.path)
        log.warning("stopping at step %d on a signal; saved %s (resume with resume=auto)", trainer.global_step, self.path)
        if self._usr1:
            raise Interrupted(f"stopped by SIGUSR1 at step {trainer.global_step}; checkpoint {self.path}")


class Interrupted(SystemExit):
    """A run stopped by a signal after saving its checkpoint (exit status 128 + the signal)."""

    def __init__(self, message: str, signum: int = getattr(signal, "SIGUSR1", 10)) -> None:
        super().__init__(128 + int(signum))
        self.message = message

    def __str__(self) -> str:
        return self.message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, tuple | list) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
