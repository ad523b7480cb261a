"""`vlm-train`: compose the config, validate it, assemble the run and fit.

Order: the run's plan (every setting validated, no weights) → data → the checkpoint (a tiny one
built if asked) → processor → data module → quantization plan (calibrated and reported, see
:mod:`vlm.build.planning`) → model (load → verify → LoRA → kernels → checkpointing → compile, see
:mod:`vlm.build.model`) → Lightning module, callbacks, loggers → fit.

On several devices (``trainer=ddp``, ``trainer=fsdp``) every rank runs this from the top and
builds its own model on its own device; only the first process writes the run directory's files
and prints (see :mod:`vlm.training.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, read_write

from vlm.build.tracking import finish_runs, offline_run_dirs, publish_quant_report, save_config
from vlm.configs import config_dir, register_resolvers
from vlm.errors import ConfigError
from vlm.sweeps.jobs import JobIdentity, claimed_gpu, free_accelerator_memory, job_identity, record_failure
from vlm.training.distributed import is_first_process, one_at_a_time

from . import console
from .wiring import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_optimizer,
    build_strategy,
    plan_for_run,
    prepare_demo_data,
    resolve_checkpoint,
    resume_from,
    run_plan,
    set_aside_stale_results,
    shards_parameters,
    target_device,
    write_resolved_config,
)

if TYPE_CHECKING:
    from vlm.build.run import RunParts, RunPlan

log = logging.getLogger("vlm.train")

# What Lightning's launcher sets in this process when it starts the other ranks of a one-node run.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# How long a finished run waits for the ranks it started to exit (seconds).
RANKS_EXIT_S = 300


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns the run summary (what ``metrics.json`` holds).

    In a sweep whose jobs run side by side on one machine (the joblib launcher), the job first
    takes a GPU of its own and holds it until it ends.
    """
    import torch

    plan = run_plan(cfg)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if plan.identity.parallel_local:
        refuse_several_devices_per_job(cfg.trainer)
    if plan.identity.parallel_local and gpus > 1 and target_device(cfg.trainer).startswith("cuda"):
        lock_dir = Path(plan.identity.sweep_dir) / ".gpu-locks"
        with claimed_gpu(lock_dir, gpus, preferred=plan.identity.job_num or 0) as gpu:
            torch.cuda.set_device(gpu)
            return fit(cfg, plan, gpu)
    return fit(cfg, plan, None)


def fit(cfg: DictConfig, plan: RunPlan, gpu: int | None) -> dict:
    """Assemble the run of ``plan`` on ``gpu`` (or where ``cfg.trainer`` says) and fit it.

    Every rank runs it; the first process alone sets stale results aside, writes ``config.yaml``,
    prints, publishes the quantization report and logs (Lightning's loggers, checkpoints and our
    run summary write on rank 0 only).
    """
    import lightning as L
    from hydra.utils import instantiate

    first = is_first_process()
    L.seed_everything(plan.seed, workers=True)  # the same seed on every rank: the same LoRA init
    checkpoint = resume_from(cfg, plan.output_dir)
    if first:
        set_aside_stale_results(plan.output_dir)
        resolved = write_resolved_config(cfg, plan.output_dir)
        console.print_run_header(cfg, resuming=checkpoint)
    parts = assemble(cfg, plan, target_device(cfg.trainer, gpu), resumed_from=checkpoint, first=first)
    placement = {"devices": [gpu]} if gpu is not None else {}
    strategy = build_strategy(cfg.trainer, plan.family, parts.module.model)
    if strategy is not None:
        placement["strategy"] = strategy
    trainer = instantiate(cfg.trainer, callbacks=parts.callbacks, logger=parts.loggers or False, **placement)
    offline_dirs: list[Path] = []
    try:
        with ranks_of_this_job(trainer):
            if first:
                for logger in parts.loggers:
                    logger.log_hyperparams(resolved)
                save_config(parts.loggers, resolved)
                offline_dirs = offline_run_dirs(parts.loggers)
                console.print_wandb_offline(offline_dirs)
                publish_quant_report(parts.planning.report, plan.output_dir, parts.loggers,
                                     top=cfg.get("report_top_layers", 15))
            validating = parts.datamodule.val_urls is not None
            if cfg.get("validate_before_fit") and validating and checkpoint is None:  # a resumed run kept its own
                trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
            trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=checkpoint, weights_only=True)
            if validating and parts.summary is not None and parts.summary.last_validated_step != trainer.global_step:
                # The final validation loss is that of the final weights, whatever the interval.
                trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
    finally:
        finish_runs()
    summary = (parts.summary.written if parts.summary is not None else None) or {}
    if first:
        console.print_final_summary(summary, plan.output_dir, offline_dirs)
    return summary


def refuse_several_devices_per_job(trainer_cfg: DictConfig) -> None:
    """A job of the side-by-side launcher (``hydra/launcher=local_gpus``) holds one GPU."""
    devices = trainer_cfg.get("devices")
    devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    asked = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 1
    if asked > 1 or int(trainer_cfg.get("num_nodes") or 1) > 1:
        raise ConfigError(
            f"trainer.devices={devices!r}: hydra/launcher=local_gpus runs one job per GPU side by side; sweep "
            "jobs of several GPUs one after another with the basic launcher, or as SLURM jobs with hydra/launcher=slurm"
        )


@contextmanager
def ranks_of_this_job(trainer: Any) -> Iterator[None]:
    """Where this process starts the other ranks (Lightning's launcher, at the first ``validate`` or
    ``fit``): they run this job, and are gone when it ends.

    The launcher runs this process's command again with ``hydra.run.dir`` set to Hydra's run
    directory, read anew: pinned here to this job's directory (a ``${now:}`` in it may have ticked
    on). In a multirun the command would run the whole sweep in each rank: it becomes this job's
    own overrides. Afterwards the ranks are waited for (killed if this one failed), and the process
    group and the launcher's variables are undone, so that the next job of a sweep starts afresh.
    Raises ``ConfigError`` where the command cannot be run again (called from Python).
    """
    from hydra.core.hydra_config import HydraConfig

    environment = getattr(trainer.strategy, "cluster_environment", None)  # a single device has none
    if trainer.world_size <= 1 or environment is None or environment.creates_processes_externally:
        yield
        return
    if not HydraConfig.initialized():
        raise ConfigError(
            f"trainer.devices={trainer.num_devices} starts the other ranks by running the command again: "
            "start the run with vlm-train (or python -m vlm.cli.train), not by calling train() from Python"
        )
    hydra_cfg = HydraConfig.get()
    saved = sys.argv, hydra_cfg.run.dir, {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if in_multirun():
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    finished = False
    try:
        yield
        finished = True
    finally:
        sys.argv = saved[0]
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved[1]
        for rank in getattr(trainer.strategy.launcher, "procs", []):
            _end(rank, finished)
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved[2].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end(rank: Any, finished: bool) -> None:
    """Wait for a rank this process started (a ``subprocess.Popen``) to exit; kill it after a
    failure here, since it would wait in a collective for this rank forever."""
    import subprocess

    if finished:
        try:
            rank.wait(timeout=RANKS_EXIT_S)
            return
        except subprocess.TimeoutExpired:
            log.warning("rank process %d did not exit %d s after the run ended: killing it", rank.pid, RANKS_EXIT_S)
    rank.kill()
    rank.wait()


def assemble(
    cfg: DictConfig, plan: RunPlan, device: str, resumed_from: str | None = None, first: bool = True
) -> RunParts:
    """Data, the quantization plan, the model built in its steps, and the Lightning parts around it.

    ``first``: this is the run's first process. The others build the same model without measuring
    it against 16-bit (the report is the first one's) and print nothing; under FSDP no rank loads
    the whole 16-bit model to measure, and the 4-bit weights are stored as the strategy needs.
    """
    # Imported here, not with the module: `main` first quiets the libraries these import (PEFT
    # imports bitsandbytes, which prints a notice while being imported).
    from hydra.utils import instantiate
    from lightning.fabric.utilities.seed import seed_everything

    from vlm.build.model import build_model
    from vlm.build.run import RunFacts, RunParts
    from vlm.cli.checks import check_lora_targets
    from vlm.data.inventory import inventory
    from vlm.models.loading import load_processor
    from vlm.training.module import VisionLanguageFineTuner

    # Ranks that start together (SLURM, torchrun) take turns: the first renders and builds, the others find it done.
    with one_at_a_time(Path(cfg.paths.cache_dir) / ".preparing.lock"):
        prepare_demo_data(cfg)
        checkpoint = resolve_checkpoint(plan.spec, plan.family, plan.seed)
    processor = load_processor(checkpoint, plan.family)
    check_lora_targets(checkpoint, plan.family, plan.lora)
    datamodule = build_datamodule(cfg.data, processor, plan.family)
    if first:
        val = inventory(datamodule.val_urls).describe() if datamodule.val_urls else None
        console.print_data_summary(cfg.data, inventory(datamodule.urls).describe(), val)
    loggers = build_loggers(cfg, plan)

    sharded = shards_parameters(cfg.trainer)
    try:
        quant = plan.quant.for_strategy(sharded)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    calibration = plan.calibration
    if sharded or not first:
        calibration = dataclasses.replace(calibration, measure=False, fidelity_batches=0)
    planning = plan_for_run(cfg, plan.family, plan.quant, calibration, checkpoint, processor, device)
    recipe = plan.model_recipe(checkpoint, device, quant, sharded=sharded)
    # LoRA's initial weights come from the seed alone, not from what planning drew before: the
    # ranks, which plan differently, must all start from the same weights.
    seed_everything(plan.seed, workers=True, verbose=False)
    built = build_model(recipe, planning)
    planning.report.loaded_bytes = built.stored_bytes
    if built.loaded_fidelity is not None:
        planning.report.fidelity["loaded"] = built.loaded_fidelity
    reports = {report.step: report.summary for report in built.reports}
    if built.kernels.enabled():
        log.info(reports["kernels"])
    if "compile" in reports:  # what model.compile ran, and what the device decided for auto
        log.info("  compile  %s", reports["compile"])
    facts = RunFacts.of(plan, checkpoint, planning, built, resumed_from)
    module = VisionLanguageFineTuner(
        built.model,
        optimizer=build_optimizer(cfg.optimizer, device, sharded),
        scheduler=instantiate(cfg.scheduler),
        build=facts.compatibility(),
    )
    callbacks, summary = build_callbacks(cfg, facts, processor)
    return RunParts(module, datamodule, callbacks, loggers, planning, summary)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> float | None:
    """One job as Hydra runs it: the metric a sweeper minimizes, and every failure recorded.

    In a sweep a failed job (bad value, out of memory, bad data) leaves ``metrics.json`` with its
    error and returns None, which a sweeper such as Optuna's records as a failed trial; the other
    jobs go on and the sweep report lists it. A single run exits with code 2 on an invalid config
    and re-raises anything else after recording it.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        summary = train(cfg)
    except SIGTERMException:
        # The checkpoint is saved and metrics.json says "interrupted"; a scheduler must not read success.
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:  # noqa: BLE001 - recorded, then re-raised or reported
        record_failure(cfg.paths.output_dir, error, _identity_or_none(cfg))
        free_accelerator_memory()
        if in_multirun():
            log.error("job failed, recorded in %s: %s", Path(cfg.paths.output_dir) / "metrics.json", error)
            return None
        if isinstance(error, ConfigError):
            print(f"vlm-train: invalid config: {error}", file=sys.stderr)
            sys.exit(2)
        raise
    return summary.get(cfg.get("optimized_metric") or "final_val_loss")


def _identity_or_none(cfg: DictConfig) -> JobIdentity | None:
    """The failed job's labels, where its config still gives them (a bad value may be why it failed)."""
    try:
        return job_identity(cfg, str(cfg.model.get("family")), str(cfg.quant.get("policy")))
    except (ValueError, KeyError, AttributeError):
        return None


def main() -> None:
    console.quiet_libraries()
    register_resolvers()
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(run_job)()


if __name__ == "__main__":
    main()
