"""What the entry points share: turning config nodes into the objects a run starts from.

Only entry points (``vlm.cli``) read the whole config; they hand plain objects onward.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlm.errors import ConfigError

log = logging.getLogger("vlm")


def instantiate_checked(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``; a value the target refuses (``ValueError``) or an argument it
    does not take (``TypeError``) becomes a ``ConfigError``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, ValueError | TypeError) or cause is error:
            raise ConfigError(str(cause)) from None
        raise


def build_components(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """Instantiate the small config objects; each validates its own keys before anything loads."""
    return {key: instantiate_checked(cfg[key]) for key in keys}


def prepare_demo_data(cfg: DictConfig) -> None:
    """Render the demo shards when the config uses them and they are not there yet."""
    from vlm.data.demo import write_demo_shards

    demo = cfg.get("demo_data")
    if not demo:
        return
    out_dir = Path(demo.out_dir)
    if sorted(out_dir.glob("train-*.tar")) and sorted(out_dir.glob("val-*.tar")):
        return
    log.info("rendering the demo data set into %s", out_dir)
    write_demo_shards(out_dir, demo.n_train, demo.n_val, demo.image_size, demo.seed)


def resolve_checkpoint(spec: Any, family: Any, seed: int) -> str:
    """The checkpoint to load: the spec's, or the tiny one built (once) for its family."""
    if not spec.is_tiny:
        return spec.checkpoint
    from vlm.data.demo import DEMO_VOCABULARY
    from vlm.models.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(family, spec.tiny_dir, DEMO_VOCABULARY, seed=seed))


def build_datamodule(data_cfg: DictConfig, processor: Any, family: Any, **overrides: Any) -> Any:
    """The data module of ``data_cfg`` around ``processor``; invalid values become a ``ConfigError``."""
    return instantiate_checked(
        data_cfg,
        processor=processor,
        image_token=family.image_token,
        pad_token_id=processor.tokenizer.pad_token_id,
        batch_major_keys=family.batch_major_image_keys,
        tile_mask_keys=family.tile_mask_keys,
        **overrides,
    )


def target_device(trainer_cfg: DictConfig | None, gpu: int | None = None) -> str:
    """Where the model loads: the job's GPU, this process's GPU in a distributed run, or the CPU."""
    import torch

    accelerator = trainer_cfg.get("accelerator") if trainer_cfg else "auto"
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{gpu if gpu is not None else int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def write_resolved_config(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return resolved


# --------------------------------------------------------------------------- W&B
def wandb_runs(loggers: list[Any]) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]


def save_config_to_wandb(loggers: list[Any], resolved: dict[str, Any]) -> None:
    """Keep the resolved config as a file of the W&B run too; offline runs hold it then, and sync it."""
    for run in wandb_runs(loggers):
        path = Path(run.dir) / "vlm_config.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        run.save(str(path), base_path=run.dir, policy="now")


def close_loggers(loggers: list[Any]) -> None:
    """Finish W&B runs, also after a failure, so the run directory is complete (config, history)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
