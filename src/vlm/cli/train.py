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
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vlm.configs import config_dir, register_resolvers

from .quantize import check_loaded, plan_for_run, publish
from .wiring import (
    ConfigError,
    announce_wandb,
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
    """Run one training job; returns the run summary (what ``metrics.json`` holds)."""
    import lightning as L
    from hydra.utils import instantiate

    from vlm.models.families import get_family
    from vlm.models.loading import load_model, load_processor
    from vlm.models.lora import apply_lora, enable_gradient_checkpointing
    from vlm.quant.memory import stored_bytes
    from vlm.training.callbacks import RunSummary
    from vlm.training.module import VisionLanguageFineTuner

    started = time.perf_counter()
    parts = build_components(cfg, ("model", "quant", "lora"))
    spec, quant, lora = parts["model"], parts["quant"], parts["lora"]
    family = get_family(spec.family)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resolved = write_resolved_config(cfg, output_dir)

    prepare_demo_data(cfg)
    checkpoint = resolve_checkpoint(spec, family, cfg.seed)
    processor = load_processor(checkpoint, family)
    datamodule = build_datamodule(cfg.data, processor, family)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    announce_wandb(loggers)

    device = target_device(cfg.trainer)
    planning = plan_for_run(cfg, spec, family, quant, checkpoint, processor)
    model, load_report = load_model(
        checkpoint, family, quant, quant_plan=planning.plan, device=device, attn_implementation=spec.attn_implementation
    )
    log.info(load_report.summary())
    planning.report.loaded_bytes = stored_bytes(model)
    loaded_fidelity = check_loaded(planning, model, device)
    if loaded_fidelity is not None:
        planning.report.fidelity["loaded"] = loaded_fidelity
    model = apply_lora(model, family, lora)
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
                    "max_seq_length": cfg.data.max_seq_length,
                    "skipped_samples": datamodule.skipped,  # filled as training runs
                }
            )
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        for logger in loggers:
            logger.log_hyperparams(resolved)
        save_config_to_wandb(loggers, resolved)
        publish(planning.report, output_dir, loggers, top=cfg.get("report_top_layers", 15))
        if cfg.get("validate_before_fit") and datamodule.val_urls is not None:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        close_loggers(loggers)

    metrics_path = output_dir / "metrics.json"
    summary = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    log.info("done in %.1f s; metrics in %s", time.perf_counter() - started, metrics_path)
    return summary


def main() -> None:
    register_resolvers()

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _run(cfg: DictConfig) -> float | None:
        try:
            summary = train(cfg)
        except ConfigError as error:
            print(f"vlm-train: invalid config: {error}", file=sys.stderr)
            sys.exit(2)
        return summary.get("final_val_loss")

    _run()


if __name__ == "__main__":
    main()
