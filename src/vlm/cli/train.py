"""`vlm-train`: compose the config, validate it, build the objects in order and fit.

The only module that sees the whole config. Everything it builds gets plain arguments.
Order: validate (no weights) → data → tiny checkpoint if asked → processor → data module →
model (load + verify quantization → LoRA → checkpointing) → Lightning module → fit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vlm.configs import config_dir, register_resolvers

log = logging.getLogger("vlm.train")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def build_components(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate the small config objects; each validates its own keys before anything loads."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    parts = {}
    for key in ("model", "quant", "lora"):
        try:
            parts[key] = instantiate(cfg[key])
        except InstantiationException as error:
            cause = error.__cause__ or error
            raise ConfigError(str(cause)) from None
    return parts


def prepare_demo_data(demo_cfg: DictConfig) -> None:
    """Render the demo shards unless they are there already."""
    from vlm.data.demo import write_demo_shards

    out_dir = Path(demo_cfg.out_dir)
    if sorted(out_dir.glob("train-*.tar")) and sorted(out_dir.glob("val-*.tar")):
        return
    log.info("rendering the demo data set into %s", out_dir)
    write_demo_shards(out_dir, demo_cfg.n_train, demo_cfg.n_val, demo_cfg.image_size, demo_cfg.seed)


def target_device(trainer_cfg: DictConfig) -> str:
    import torch

    if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the run summary (what ``metrics.json`` holds)."""
    import lightning as L
    from hydra.utils import instantiate

    from vlm.models.families import get_family
    from vlm.models.loading import load_model, load_processor
    from vlm.models.lora import apply_lora, enable_gradient_checkpointing
    from vlm.training.callbacks import RunSummary
    from vlm.training.module import VisionLanguageFineTuner

    started = time.perf_counter()
    parts = build_components(cfg)
    spec, quant, lora = parts["model"], parts["quant"], parts["lora"]
    family = get_family(spec.family)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))

    if cfg.get("demo_data"):
        prepare_demo_data(cfg.demo_data)
    checkpoint = spec.checkpoint
    if spec.is_tiny:
        from vlm.data.demo import DEMO_VOCABULARY
        from vlm.models.tiny import build_tiny_checkpoint

        checkpoint = str(build_tiny_checkpoint(family, spec.tiny_dir, DEMO_VOCABULARY, seed=cfg.seed))

    processor = load_processor(checkpoint, family)
    try:
        datamodule = instantiate(
            cfg.data,
            processor=processor,
            image_token=family.image_token,
            pad_token_id=processor.tokenizer.pad_token_id,
            batch_major_keys=family.batch_major_image_keys,
        )
    except Exception as error:  # Hydra wraps the data module's ValueError
        cause = error.__cause__ or error
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        raise

    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    announce_wandb(loggers)

    model, load_report = load_model(
        checkpoint, family, quant, device=target_device(cfg.trainer), attn_implementation=spec.attn_implementation
    )
    log.info(load_report.summary())
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
        if cfg.get("validate_before_fit") and datamodule.val_urls is not None:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        close_loggers(loggers)

    metrics_path = output_dir / "metrics.json"
    summary = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    log.info("done in %.1f s; metrics in %s", time.perf_counter() - started, metrics_path)
    return summary


def save_config_to_wandb(loggers: list[Any], resolved: dict[str, Any]) -> None:
    """Keep the resolved config as a file of the W&B run too; offline runs hold it then, and sync it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            path = Path(run.dir) / "vlm_config.yaml"
            path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
            run.save(str(path), base_path=run.dir, policy="now")


def close_loggers(loggers: list[Any]) -> None:
    """Finish W&B runs, also after a failure, so the run directory is complete (config, history)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def announce_wandb(loggers: list[Any]) -> None:
    """One clear line when W&B runs offline, with how to upload the run later."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._offline:
            print(
                f"W&B is offline (no API key): the run is saved under {logger.save_dir}/wandb; "
                "upload it later with `wandb sync <that run directory>`",
                file=sys.stderr,
            )


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
