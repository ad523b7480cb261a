"""`vlm-train`: compose the config, validate it, build the objects in order and fit.

The only module that sees the whole config. Everything it builds gets plain arguments.
Order: validate (no weights) → data → tiny checkpoint if asked → processor → data module →
quantization plan (calibrated and reported, see `vlm.cli.quantize`) → model (load + verify
quantization → LoRA → checkpointing) → Lightning module → fit.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vlm.configs import config_dir, register_resolvers

from vlm.sweeps.jobs import JobIdentity, claimed_gpu, free_accelerator_memory, job_identity, record_failure

from . import console
from .quantize import check_loaded, plan_for_run, publish
from .wiring import (
    ConfigError,
    build_components,
    build_datamodule,
    close_loggers,
    prepare_demo_data,
    resolve_checkpoint,
    save_config_to_wandb,
    target_device,
    write_resolved_config,
)

log = logging.getLogger("vlm.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the run summary (what ``metrics.json`` holds).

    In a sweep whose jobs run side by side on one machine (the joblib launcher), the job first
    takes a GPU of its own and holds it until it ends.
    """
    import torch

    parts = build_components(cfg, ("model", "quant", "lora", "kernels"))
    identity = job_identity(cfg, parts["model"].family, parts["quant"].policy)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if identity.parallel_local and gpus > 1 and target_device(cfg.trainer).startswith("cuda"):
        with claimed_gpu(Path(identity.sweep_dir) / ".gpu-locks", gpus, preferred=identity.job_num or 0) as gpu:
            torch.cuda.set_device(gpu)
            return _fit(cfg, parts, identity, gpu)
    return _fit(cfg, parts, identity, None)


def _fit(cfg: DictConfig, parts: dict[str, Any], identity: JobIdentity, gpu: int | None) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import instantiate

    from vlm.data.inventory import inventory
    from vlm.models.families import get_family
    from vlm.models.loading import load_model, load_processor
    from vlm.models.lora import apply_lora, enable_gradient_checkpointing
    from vlm.patching import apply_kernels
    from vlm.quant.memory import stored_bytes
    from vlm.training.callbacks import RunSummary
    from vlm.training.module import VisionLanguageFineTuner

    spec, quant, lora = parts["model"], parts["quant"], parts["lora"]
    family = get_family(spec.family)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resolved = write_resolved_config(cfg, output_dir)
    console.print_run_header(cfg)

    prepare_demo_data(cfg)
    checkpoint = resolve_checkpoint(spec, family, cfg.seed)
    processor = load_processor(checkpoint, family)
    datamodule = build_datamodule(cfg.data, processor, family)
    console.print_data_summary(
        cfg.data,
        inventory(datamodule.urls).describe(),
        inventory(datamodule.val_urls).describe() if datamodule.val_urls else None,
    )
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg, identity)

    device = target_device(cfg.trainer, gpu)
    planning = plan_for_run(cfg, spec, family, quant, checkpoint, processor, device)
    model, load_report = load_model(
        checkpoint, family, quant, quant_plan=planning.plan, device=device, attn_implementation=spec.attn_implementation
    )
    planning.report.loaded_bytes = stored_bytes(model)
    loaded_fidelity = check_loaded(planning, model, device)
    if loaded_fidelity is not None:
        planning.report.fidelity["loaded"] = loaded_fidelity
    model = apply_lora(model, family, lora)
    patches = apply_kernels(model, parts["kernels"])
    if parts["kernels"].enabled():
        log.info(patches.summary())
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    module = VisionLanguageFineTuner(
        model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler)
    )
    for callback in callbacks:
        if isinstance(callback, RunSummary):
            callback.extra.update(
                {
                    "family": family.model_type,
                    "checkpoint": checkpoint,
                    "quant_policy": quant.policy,
                    "quant_method": quant.method,
                    "kept_in_16bit": list(load_report.plan.kept),
                    "weight_bytes": planning.report.loaded_bytes,
                    "quant_fidelity": {k: v.as_dict() for k, v in planning.report.fidelity.items()},
                    "lora_r": lora.r,
                    "kernels": dict(patches.patched),
                    "max_seq_length": cfg.data.max_seq_length,
                    "skipped_samples": datamodule.skipped,  # filled as training runs
                    **identity.as_dict(),
                }
            )
    placement = {"devices": [gpu]} if gpu is not None else {}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **placement)
    offline_dirs: list[Path] = []
    try:
        for logger in loggers:
            logger.log_hyperparams(resolved)
        save_config_to_wandb(loggers, resolved)
        offline_dirs = console.wandb_offline_dirs(loggers)
        console.print_wandb_offline(offline_dirs)
        publish(planning.report, output_dir, loggers, top=cfg.get("report_top_layers", 15))
        if cfg.get("validate_before_fit") and datamodule.val_urls is not None:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        close_loggers(loggers)

    metrics_path = output_dir / "metrics.json"
    summary = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    console.print_final_summary(summary, output_dir, offline_dirs)
    return summary


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The configured callbacks; without the progress bar where ``trainer.enable_progress_bar=false``
    (Lightning refuses a progress bar callback then)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks.progress import ProgressBar

    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar", True) is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build_loggers(cfg: DictConfig, identity: JobIdentity) -> list[Any]:
    """The configured loggers; a W&B run is named after the job's overrides, grouped by its sweep
    (unless ``logger.wandb.group`` is set) and tagged with model, quant policy, rank and length."""
    from hydra.utils import instantiate

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        extra: dict[str, Any] = {}
        if str(node.get("_target_", "")).endswith("WandbLogger"):
            extra = {
                "name": identity.name,
                "group": node.get("group") or identity.group,
                "tags": [*(node.get("tags") or []), *identity.tags],
            }
        loggers.append(instantiate(node, **extra))
    return loggers


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
    try:
        summary = train(cfg)
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
    try:
        return job_identity(cfg, str(cfg.model.get("family")), str(cfg.quant.get("policy")))
    except Exception:  # noqa: BLE001 - the failure being recorded matters more than its labels
        return None


def main() -> None:
    console.quiet_libraries()
    register_resolvers()
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(run_job)()


if __name__ == "__main__":
    main()
