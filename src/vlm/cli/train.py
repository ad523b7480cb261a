"""`vlm-train`: compose the config, validate it, assemble the run and fit.

Order: the run's plan (every setting validated, no weights) → data → the checkpoint (a tiny one
built if asked) → processor → data module → quantization plan (calibrated and reported, see
:mod:`vlm.build.planning`) → model (load → verify → LoRA → kernels → checkpointing, see
:mod:`vlm.build.model`) → Lightning module, callbacks, loggers → fit.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from vlm.build.tracking import finish_runs, offline_run_dirs, publish_quant_report, save_config
from vlm.configs import config_dir, register_resolvers
from vlm.errors import ConfigError
from vlm.sweeps.jobs import JobIdentity, claimed_gpu, free_accelerator_memory, job_identity, record_failure

from . import console
from .wiring import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    plan_for_run,
    prepare_demo_data,
    resolve_checkpoint,
    resume_from,
    run_plan,
    set_aside_stale_results,
    target_device,
    write_resolved_config,
)

if TYPE_CHECKING:
    from vlm.build.run import RunParts, RunPlan

log = logging.getLogger("vlm.train")


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns the run summary (what ``metrics.json`` holds).

    In a sweep whose jobs run side by side on one machine (the joblib launcher), the job first
    takes a GPU of its own and holds it until it ends.
    """
    import torch

    plan = run_plan(cfg)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if plan.identity.parallel_local and gpus > 1 and target_device(cfg.trainer).startswith("cuda"):
        lock_dir = Path(plan.identity.sweep_dir) / ".gpu-locks"
        with claimed_gpu(lock_dir, gpus, preferred=plan.identity.job_num or 0) as gpu:
            torch.cuda.set_device(gpu)
            return fit(cfg, plan, gpu)
    return fit(cfg, plan, None)


def fit(cfg: DictConfig, plan: RunPlan, gpu: int | None) -> dict:
    """Assemble the run of ``plan`` on ``gpu`` (or where ``cfg.trainer`` says) and fit it."""
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(plan.seed, workers=True)
    checkpoint = resume_from(cfg, plan.output_dir)
    set_aside_stale_results(plan.output_dir)
    resolved = write_resolved_config(cfg, plan.output_dir)
    console.print_run_header(cfg, resuming=checkpoint)
    parts = assemble(cfg, plan, target_device(cfg.trainer, gpu), resumed_from=checkpoint)
    placement = {"devices": [gpu]} if gpu is not None else {}
    trainer = instantiate(cfg.trainer, callbacks=parts.callbacks, logger=parts.loggers or False, **placement)
    try:
        for logger in parts.loggers:
            logger.log_hyperparams(resolved)
        save_config(parts.loggers, resolved)
        offline_dirs = offline_run_dirs(parts.loggers)
        console.print_wandb_offline(offline_dirs)
        publish_quant_report(parts.planning.report, plan.output_dir, parts.loggers, top=cfg.get("report_top_layers", 15))
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
    console.print_final_summary(summary, plan.output_dir, offline_dirs)
    return summary


def assemble(cfg: DictConfig, plan: RunPlan, device: str, resumed_from: str | None = None) -> RunParts:
    """Data, the quantization plan, the model built in its steps, and the Lightning parts around it."""
    # Imported here, not with the module: `main` first quiets the libraries these import (PEFT
    # imports bitsandbytes, which prints a notice while being imported).
    from hydra.utils import instantiate

    from vlm.build.model import ModelRecipe, build_model
    from vlm.build.run import RunFacts, RunParts
    from vlm.cli.checks import check_lora_targets
    from vlm.data.inventory import inventory
    from vlm.models.loading import load_processor
    from vlm.training.module import VisionLanguageFineTuner

    prepare_demo_data(cfg)
    checkpoint = resolve_checkpoint(plan.spec, plan.family, plan.seed)
    processor = load_processor(checkpoint, plan.family)
    check_lora_targets(checkpoint, plan.family, plan.lora)
    datamodule = build_datamodule(cfg.data, processor, plan.family)
    val = inventory(datamodule.val_urls).describe() if datamodule.val_urls else None
    console.print_data_summary(cfg.data, inventory(datamodule.urls).describe(), val)
    loggers = build_loggers(cfg, plan)

    planning = plan_for_run(cfg, plan.family, plan.quant, plan.calibration, checkpoint, processor, device)
    recipe = ModelRecipe(
        checkpoint=checkpoint,
        family=plan.family,
        quant=plan.quant,
        lora=plan.lora,
        kernels=plan.kernels,
        gradient_checkpointing=plan.spec.gradient_checkpointing,
        device=device,
        attn_implementation=plan.spec.attn_implementation,
    )
    built = build_model(recipe, planning)
    planning.report.loaded_bytes = built.stored_bytes
    if built.loaded_fidelity is not None:
        planning.report.fidelity["loaded"] = built.loaded_fidelity
    if plan.kernels.enabled():
        log.info(built.patches.summary())
    facts = RunFacts.of(plan, checkpoint, planning, built, resumed_from)
    module = VisionLanguageFineTuner(
        built.model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        build=facts.compatibility(),
    )
    callbacks, summary = build_callbacks(cfg, facts)
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
