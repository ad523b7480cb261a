"""What one job of a sweep knows about itself: its name, group and tags for tracking, the GPU it
may use, and how a failure is recorded so that the sweep goes on and the report can show it."""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Overrides that say where a job writes or how it logs, not what it trains: left out of run names.
NOT_IN_RUN_NAMES = ("paths.", "hydra.", "logger.", "callbacks.", "demo_data.", "sweep_name")
FAILURE_FILE = "error.txt"


@dataclass(frozen=True)
class JobIdentity:
    """How a run is named and grouped in W&B and in the sweep report."""

    name: str
    group: str | None  # the sweep's name; None for a single run
    tags: tuple[str, ...]
    overrides: tuple[str, ...]
    job_num: int | None  # the job's number in its sweep; None for a single run
    sweep_dir: str | None = None
    parallel_local: bool = False  # jobs share this machine's GPUs (joblib launcher)

    def as_dict(self) -> dict[str, Any]:
        return {"run_name": self.name, "sweep": self.group, "job_num": self.job_num, "overrides": list(self.overrides)}


def run_name(overrides: tuple[str, ...] | list[str], default: str, swept: set[str] | None = None) -> str:
    """``lora.r=8,quant=bridge_skip``: a job's overrides of the ``swept`` keys (in a sweep), or
    all its overrides but locations and logging (a single run); ``default`` when none are left."""
    def key(override: str) -> str:
        return override.lstrip("+~").partition("=")[0]

    if swept:
        kept = [o for o in overrides if key(o) in swept]
    else:
        kept = [o for o in overrides if not key(o).startswith(NOT_IN_RUN_NAMES)]
    return ",".join(kept) or default


def swept_keys(sweep_dir: str | Path) -> set[str]:
    """The keys a sweep varies: its sweep overrides (``lora.r=8,16``) and its sweeper's params,
    read from the ``multirun.yaml`` the sweeper writes before launching any job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return set()
    config = OmegaConf.load(path)
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {o.key_or_group for o in overrides if o.is_sweep_override()}
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return keys | set(params)


def job_identity(cfg: Any, model: str, quant: str) -> JobIdentity:
    """The identity of the running job, from Hydra's runtime state when there is one.

    ``model`` and ``quant`` are the fallbacks for the chosen config names, which Hydra knows
    when it composed the config itself.
    """
    from hydra.core.hydra_config import HydraConfig

    lora_r = cfg.get("lora", {}).get("r")
    seq = cfg.get("data", {}).get("max_seq_length")
    if not HydraConfig.initialized():
        tags = (f"model={model}", f"quant={quant}", f"r={lora_r}", f"seq={seq}")
        return JobIdentity(name=cfg.get("task_name", "run"), group=cfg.get("sweep_name"), tags=tags, overrides=(), job_num=None)
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = (f"model={choices.get('model', model)}", f"quant={choices.get('quant', quant)}", f"r={lora_r}", f"seq={seq}")
    overrides = tuple(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = cfg.get("sweep_name") or (f"{cfg.task_name}-{Path(hydra_cfg.sweep.dir).name}" if multirun else None)
    launcher = str(hydra_cfg.launcher.get("_target_", "")) if hydra_cfg.get("launcher") else ""
    return JobIdentity(
        name=run_name(overrides, cfg.task_name, swept_keys(hydra_cfg.sweep.dir) if multirun else None),
        group=group,
        tags=tags,
        overrides=overrides,
        job_num=hydra_cfg.job.num if multirun else None,
        sweep_dir=str(hydra_cfg.sweep.dir) if multirun else None,
        parallel_local=multirun and "joblib" in launcher.lower(),
    )


@contextmanager
def claimed_gpu(lock_dir: str | Path, count: int, preferred: int = 0, poll_s: float = 5.0) -> Iterator[int]:
    """Hold one of ``count`` GPUs for the duration of a job, by a lock file per GPU.

    Jobs running side by side on one machine take a free GPU each, starting their search at
    ``preferred`` (the job number) so that the first wave spreads out; when all are taken, the
    job waits for one. Locks vanish with their process, so a crashed job frees its GPU.
    """
    import fcntl

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for offset in range(count):
            index = (preferred + offset) % count
            handle = open(lock_dir / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)


def record_failure(output_dir: str | Path, error: BaseException, identity: JobIdentity | None = None) -> Path:
    """``metrics.json`` with ``"status": "failed"`` and the error, plus the traceback in ``error.txt``.

    Keeps whatever the training callbacks already wrote (a failure mid-training has its losses).
    A rank other than the first of a run spread over several writes its traceback to
    ``error-<rank>.txt``, and ``metrics.json`` only where the first has not written one (a failing
    rank usually takes the first down without a word).
    """
    from vlm.training.distributed import is_first_process, process_label

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    if not is_first_process():
        (output_dir / f"error-{process_label()}.txt").write_text("".join(traceback.format_exception(error)))
        if path.exists():
            return path
    try:
        metrics = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        metrics = {}
    metrics.update({"status": "failed", "error": f"{type(error).__name__}: {error}".strip()})
    if identity is not None:
        metrics.update(identity.as_dict())
    path.write_text(json.dumps(metrics, indent=2, default=str))
    (output_dir / FAILURE_FILE).write_text("".join(traceback.format_exception(error)))
    return path


def free_accelerator_memory() -> None:
    """After a failed job, so that the next job in the same process starts with the memory free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
