"""Training callbacks: throughput/memory monitoring and the end-of-run summary."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning
import torch

from vlm.quant.bnb_layers import quantized_layer_names
from vlm.training.distributed import gather_per_rank
from vlm.training.fsdp import save_adapter
from vlm.training.plain import plain

__all__ = [
    "ThroughputMonitor",
    "RunSummary",
    "count_parameters",
    "peak_memory_bytes",
    "reset_peak_memory",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def peak_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Peak memory since :func:`reset_peak_memory` (or the process start), in bytes: the CUDA
    allocator's peak on a CUDA device, else the peak resident set size. ``None`` where unknown."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    peak = _resident_peak_linux()
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start counting the peak afresh: one job's peak, not the lifetime peak of a sweep's process.

    On Linux the kernel's resident-set peak (``VmHWM``) is reset by writing 5 to
    ``/proc/self/clear_refs``; elsewhere the CPU peak stays the process's lifetime peak.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _resident_peak_linux() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def _logical_numel(p: torch.Tensor) -> int:
    """Number of weights ``p`` stands for (a packed 4-bit ``Params4bit`` counts its original shape)."""
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return int(math.prod(shape))
    return int(p.numel())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plain(payload), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; others on a cluster read results
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out if math.isfinite(out) else None


def _is_fitting(trainer: lightning.Trainer) -> bool:
    fn = getattr(trainer.state, "fn", None)
    return getattr(fn, "value", fn) == "fit"


# --------------------------------------------------------------------------- throughput
class ThroughputMonitor(lightning.Callback):
    """Logs training throughput and peak memory, and keeps totals for :class:`RunSummary`.

    Every ``log_every_n_steps`` training batches (default: the Trainer's ``log_every_n_steps``;
    set it to 1 for per-step values) it writes to ``trainer.loggers``:

    * ``perf/tokens_per_s``: non-padding tokens (``attention_mask.sum()``) per second,
    * ``perf/samples_per_s``, ``perf/step_time_s`` (mean over the window),
    * ``perf/peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on CUDA, else peak RSS,
    * ``perf/tokens_total``.

    Time counts from the start of training, including data loading, excluding validation
    runs inside ``fit``. On CUDA the token counts stay on the device and are read with one
    ``.item()`` per logged window, which also waits for the window's GPU work, so the timing is
    honest without other syncs. On several ranks the logged numbers are the run's: tokens and
    samples per second summed over the ranks, step time and peak memory their maximum;
    :meth:`summary` stays this process's own.
    """

    # How a logged number of one rank combines with the others' (the window is the same steps on each).
    REDUCTIONS: ClassVar[dict[str, str]] = {"tokens_per_s": "sum", "samples_per_s": "sum", "tokens_total": "sum",
                  "step_time_s": "max", "peak_memory_bytes": "max"}

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "perf/") -> None:
        if log_every_n_steps is not None and int(log_every_n_steps) < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or None, got {log_every_n_steps!r}")
        self.log_every_n_steps = None if log_every_n_steps is None else int(log_every_n_steps)
        self.prefix = prefix
        self._reset_totals()

    # ---- bookkeeping
    def _reset_totals(self) -> None:
        self.total_tokens = 0
        self.total_samples = 0
        self.total_steps = 0  # training batches seen
        self.train_time_s = 0.0
        self.last_metrics: dict[str, float] = {}
        self._device = torch.device("cpu")
        self._reset_window()
        self._t_mark: float | None = None  # start of the not-yet-accounted training time

    def _reset_window(self) -> None:
        self._win_tokens = 0
        self._win_tokens_dev: torch.Tensor | None = None
        self._win_samples = 0
        self._win_steps = 0
        self._win_time = 0.0  # time already accounted for this window (before a validation pause)

    def _interval(self, trainer: lightning.Trainer) -> int:
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))

    @staticmethod
    def _count(batch: Any) -> tuple[int | torch.Tensor, int]:
        """``(tokens, samples)``; tokens stay a device tensor when the mask is not on the CPU."""
        if not isinstance(batch, Mapping):
            return 0, 0
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        samples = 0
        for t in (ids, mask, batch.get("labels")):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                samples = int(t.shape[0])
                break
        if isinstance(mask, torch.Tensor):
            tokens = mask.sum(dtype=torch.int64) if mask.dtype != torch.bool else mask.sum()
            return (int(tokens) if tokens.device.type == "cpu" else tokens), samples
        if isinstance(ids, torch.Tensor):
            return int(ids.numel()), samples
        return 0, samples

    def _flush(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule | None = None) -> None:
        """Close the window; with ``pl_module``, log its metrics (Lightning puts them at its own step,
        beside ``train/loss``)."""
        if self._win_steps == 0:
            return
        tokens = self._win_tokens
        if self._win_tokens_dev is not None:
            tokens += int(self._win_tokens_dev.item())  # the one host sync of the window
        elif self._device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        elapsed = self._win_time + (now - self._t_mark if self._t_mark is not None else 0.0)
        if self._t_mark is not None:
            self._t_mark = now
        self.total_tokens += tokens
        self.total_samples += self._win_samples
        self.total_steps += self._win_steps
        self.train_time_s += elapsed
        safe = max(elapsed, 1e-12)
        metrics = {
            f"{self.prefix}tokens_per_s": tokens / safe,
            f"{self.prefix}samples_per_s": self._win_samples / safe,
            f"{self.prefix}step_time_s": elapsed / self._win_steps,
            f"{self.prefix}tokens_total": float(self.total_tokens),
        }
        peak = peak_memory_bytes(self._device)
        if peak is not None:
            metrics[f"{self.prefix}peak_memory_bytes"] = float(peak)
        self.last_metrics = metrics
        self._reset_window()
        if pl_module is not None:
            distributed = trainer.world_size > 1
            for key, value in metrics.items():
                reduce_fx = self.REDUCTIONS[key.removeprefix(self.prefix)] if distributed else "mean"
                pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1, sync_dist=distributed,
                              reduce_fx=reduce_fx)

    def summary(self, trainer: lightning.Trainer | None = None) -> dict[str, Any]:
        """Totals of the training so far (flushes a pending window first)."""
        if trainer is not None:
            self._flush(trainer)
        t = self.train_time_s
        return {
            "tokens_per_s": self.total_tokens / t if t > 0 else None,
            "samples_per_s": self.total_samples / t if t > 0 else None,
            "mean_step_time_s": t / self.total_steps if self.total_steps else None,
            "train_time_s": t,
            "total_tokens": self.total_tokens,
            "total_samples": self.total_samples,
            "train_batches": self.total_steps,
            "peak_memory_bytes": peak_memory_bytes(self._device),
        }

    # ---- hooks
    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._reset_totals()
        self._device = pl_module.device
        reset_peak_memory(self._device)

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._device = pl_module.device
        self._t_mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self._t_mark is None:
            self._t_mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        # Counted after the step: on CUDA the sum is queued behind the step's kernels, so
        # reading it at flush time also waits for them.
        tokens, samples = self._count(batch)
        if isinstance(tokens, torch.Tensor):
            self._win_tokens_dev = tokens if self._win_tokens_dev is None else self._win_tokens_dev + tokens
        else:
            self._win_tokens += tokens
        self._win_samples += samples
        self._win_steps += 1
        if self._win_steps >= self._interval(trainer):
            self._flush(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if _is_fitting(trainer) and not trainer.sanity_checking and self._t_mark is not None:
            self._win_time += time.perf_counter() - self._t_mark
            self._t_mark = None  # paused

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if _is_fitting(trainer) and not trainer.sanity_checking and self._t_mark is None and self.total_steps + self._win_steps > 0:
            self._t_mark = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._flush(trainer)  # counted in the totals; Lightning takes no more logs once training ended
        self._t_mark = None


# --------------------------------------------------------------------------- run summary
class RunSummary(lightning.Callback):
    """Saves the adapter and writes ``metrics.json`` when training ends (rank zero).

    ``output_dir/adapter_dirname`` gets ``model.save_pretrained(..., safe_serialization=True)``
    of the LightningModule's ``model`` (the PEFT model). ``output_dir/metrics.json`` gets the
    losses, throughput (from a :class:`ThroughputMonitor` in the same Trainer, if any), timing,
    parameter counts, the data module's skip counts and ``facts`` (how the run was built, e.g.
    :meth:`vlm.build.run.RunFacts.as_dict`), with ``"status": "completed"``; on an exception it gets
    ``"status": "failed"`` and ``"error"`` instead (the adapter is then not saved).

    On several ranks every rank calls the hooks, and rank 0 writes: the training loss averaged over
    the ranks (each rank's loss is its share of the global batch's, see
    :class:`~vlm.training.module.VisionLanguageFineTuner`), tokens and samples summed, tokens per
    second over the slowest rank's training time, peak memory the largest rank's, and
    ``samples_per_rank``/``peak_memory_per_rank`` besides.

    ``initial_val_loss`` is the first validation result seen (run ``trainer.validate(module,
    datamodule=...)`` on the same Trainer before ``fit`` to get the untrained baseline; the
    sanity check does not count), ``final_val_loss`` the latest. A validation run *after*
    ``fit`` (same Trainer) rewrites ``metrics.json`` with the new ``final_val_loss``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        adapter_dirname: str = "adapter",
        facts: Mapping[str, Any] | None = None,
        filename: str = "metrics.json",
        val_metric: str = "val/loss",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.adapter_dirname = adapter_dirname
        self.facts = dict(facts or {})
        self.written: dict[str, Any] | None = None  # what metrics.json holds, once written
        self.filename = filename
        self.val_metric = val_metric
        self._t0: float | None = None
        self._train_t0: float | None = None
        self._train_time_fallback: float | None = None
        self._first_loss: torch.Tensor | float | None = None
        self._last_loss: torch.Tensor | float | None = None
        self._val_history: list[dict[str, Any]] = []
        self._status: str | None = None
        self._adapter_dir: Path | None = None
        self._samples = 0  # training samples this rank trained on
        self._parameters: tuple[int, int] | None = None  # (trainable, total), counted before any sharding
        self._ranks: dict[str, list[float | None]] | None = None  # per-rank totals, gathered when training ends

    @property
    def last_validated_step(self) -> int | None:
        """The global step of the latest validation (a run's final loss must come from its last step)."""
        return self._val_history[-1]["step"] if self._val_history else None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / self.filename

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / self.adapter_dirname

    # ---- checkpointed state (so a resumed run keeps its first losses)
    def state_dict(self) -> dict[str, Any]:
        return {
            "first_train_loss": _to_float(self._first_loss),
            "val_history": plain(self._val_history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("first_train_loss") is not None:
            self._first_loss = float(state_dict["first_train_loss"])
        history = state_dict.get("val_history")
        if history:
            self._val_history = [dict(h) for h in history]

    # ---- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: ANN001
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self._parameters is None:  # before FSDP shards the weights
            self._parameters = count_parameters(getattr(pl_module, "model", pl_module))

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._train_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._samples += ThroughputMonitor._count(batch)[1]
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()  # kept on the device: read once, at the end
            if self._first_loss is None:
                self._first_loss = loss
            self._last_loss = loss

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.val_metric)
        if value is None:
            return
        fn = getattr(trainer.state, "fn", None)
        self._val_history.append(
            {"value": _to_float(value), "step": int(trainer.global_step), "stage": str(getattr(fn, "value", fn))}
        )
        if self._status == "completed" and not _is_fitting(trainer) and trainer.is_global_zero:
            self._write(trainer, pl_module, status="completed")  # post-fit validation: new final loss

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self._train_t0 is not None:
            self._train_time_fallback = time.perf_counter() - self._train_t0
        # Collectives on several ranks: every rank takes part, rank 0 writes.
        self._ranks = gather_per_rank(trainer, self._rank_totals(trainer, pl_module))
        if save_adapter(trainer, getattr(pl_module, "model", pl_module), self.adapter_dir):
            self._adapter_dir = self.adapter_dir
        if trainer.is_global_zero:
            self._write(trainer, pl_module, status="completed")
        self._status = "completed"

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # noqa: ANN001
        # A signal (SIGTERM, SIGUSR1) ends a run as SystemExit, after its checkpoint was saved.
        self._status = "interrupted" if isinstance(exception, SystemExit) else "failed"
        if not trainer.is_global_zero:
            return
        try:
            self._write(trainer, pl_module, status=self._status, error=exception)
        except Exception:  # noqa: BLE001 - never mask the original exception
            log.exception("RunSummary: could not write %s after a failure", self.metrics_path)

    # ---- summary
    def _monitor(self, trainer: lightning.Trainer) -> ThroughputMonitor | None:
        for cb in trainer.callbacks:
            if isinstance(cb, ThroughputMonitor):
                return cb
        return None

    def _rank_totals(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> dict[str, Any]:
        """This rank's numbers that the run's summary combines over the ranks."""
        monitor = self._monitor(trainer)
        perf = monitor.summary(trainer) if monitor is not None else {}
        return {
            "first_train_loss": _to_float(self._first_loss),
            "last_train_loss": _to_float(self._last_loss),
            "total_tokens": perf.get("total_tokens"),
            "samples": self._samples,
            "train_time_s": perf.get("train_time_s") if monitor is not None else self._train_time_fallback,
            "train_batches": perf.get("train_batches"),
            "peak_memory_bytes": perf.get("peak_memory_bytes") or peak_memory_bytes(pl_module.device),
        }

    def _combined(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> dict[str, Any]:
        """The run's numbers: over the ranks as gathered when training ended, else (training has not
        ended: a failure, or a validation without training) this process's own."""
        per_rank = self._ranks or {k: [v] for k, v in self._rank_totals(trainer, pl_module).items()}

        def known(key: str) -> list[float]:
            return [v for v in per_rank[key] if v is not None]

        def total(key: str) -> int | None:
            return int(sum(known(key))) if known(key) else None

        def mean(key: str) -> float | None:
            return sum(known(key)) / len(known(key)) if known(key) else None

        slowest = max(known("train_time_s"), default=None)
        tokens, samples, batches = total("total_tokens"), total("samples"), max(known("train_batches"), default=None)
        return {
            "first_train_loss": mean("first_train_loss"),
            "last_train_loss": mean("last_train_loss"),
            "tokens_per_s": tokens / slowest if tokens is not None and slowest else None,
            "samples_per_s": samples / slowest if samples is not None and slowest else None,
            "mean_step_time_s": slowest / batches if slowest and batches else None,
            "total_tokens": tokens,
            "total_samples": samples,
            "samples_per_rank": [int(v or 0) for v in per_rank["samples"]],
            "peak_memory_bytes": int(max(known("peak_memory_bytes"))) if known("peak_memory_bytes") else None,
            "peak_memory_per_rank": [None if v is None else int(v) for v in per_rank["peak_memory_bytes"]],
            "train_time_s": slowest,
        }

    def collect(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> dict[str, Any]:
        """The metrics dict (without ``status``)."""
        vals = [h.get("value") for h in self._val_history]
        initial = vals[0] if vals else None
        final = vals[-1] if vals else None
        reduction = 1.0 - final / initial if initial not in (None, 0.0) and final is not None else None
        model = getattr(pl_module, "model", pl_module)
        trainable, total = self._parameters or count_parameters(model)
        skipped = getattr(trainer.datamodule, "skipped", None)  # counted by the data module as batches arrive
        combined = self._combined(trainer, pl_module)
        return {
            "first_train_loss": combined.pop("first_train_loss"),
            "last_train_loss": combined.pop("last_train_loss"),
            "initial_val_loss": initial,
            "final_val_loss": final,
            "val_loss_reduction": reduction,
            "val_loss_history": self._val_history,
            **{key: combined[key] for key in ("tokens_per_s", "samples_per_s", "mean_step_time_s", "total_tokens",
                                              "total_samples", "samples_per_rank", "peak_memory_bytes",
                                              "peak_memory_per_rank")},
            "wall_time_s": time.perf_counter() - self._t0 if self._t0 is not None else None,
            "train_time_s": combined["train_time_s"],
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "world_size": int(trainer.world_size),
            "strategy": type(trainer.strategy).__name__,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_fraction": trainable / total if total else None,
            "quantized_linear_layers": len(quantized_layer_names(model)),
            "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None,
            "adapter_dir": str(self._adapter_dir) if self._adapter_dir is not None else None,
            **({"skipped_samples": dict(skipped)} if skipped is not None else {}),
            **self.facts,
        }

    def _write(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        status: str,
        error: BaseException | None = None,
    ) -> Path:
        payload: dict[str, Any] = {**self.collect(trainer, pl_module), "status": status}  # facts never override it
        if error is not None:
            payload["error"] = f"{type(error).__name__}: {error}"
        _write_json_atomic(self.metrics_path, payload)
        self.written = plain(payload)
        return self.metrics_path
