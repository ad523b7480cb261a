"""Config → objects, for the entry points: the run's plan, its data, its planning, its callbacks
and loggers. The only code besides the entry points that reads the whole config; everything it
builds gets plain arguments or typed settings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlm.build.planning import (
    Planning,
    needs_measurement,
    plan_checkpoint,
    take_batches,
)
from vlm.build.run import RunFacts, RunPlan
from vlm.cli.checks import check_run_config
from vlm.errors import ConfigError
from vlm.models.families import ModelFamily, get_family
from vlm.quant.calibrate import CalibrationSettings
from vlm.quant.config import QuantConfig
from vlm.sweeps.jobs import job_identity

log = logging.getLogger("vlm")

# The callback that writes metrics.json, built with the facts of how the run was built.
RUN_SUMMARY = "run_summary"
# The callback that answers validation questions while training, built with the run's processor.
GENERATION = "generation"


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


def run_plan(cfg: DictConfig) -> RunPlan:
    """The typed settings of a training run; each validates its own keys before anything loads."""
    check_run_config(cfg)
    spec, quant = instantiate_checked(cfg.model), instantiate_checked(cfg.quant)
    return RunPlan(
        spec=spec,
        family=get_family(spec.family),
        quant=quant,
        lora=instantiate_checked(cfg.lora),
        kernels=instantiate_checked(cfg.kernels),
        calibration=instantiate_checked(cfg.calibration),
        identity=job_identity(cfg, spec.family, str(quant.policy)),
        output_dir=Path(cfg.paths.output_dir),
        seed=int(cfg.seed),
        max_seq_length=int(cfg.data.max_seq_length),
    )


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


def resolve_checkpoint(spec: Any, family: ModelFamily, seed: int) -> str:
    """The checkpoint to load: the spec's, or the tiny one built (once) for its family."""
    if not spec.is_tiny:
        return spec.checkpoint
    from vlm.data.demo import DEMO_VOCABULARY
    from vlm.models.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(family, spec.tiny_dir, DEMO_VOCABULARY, seed=seed))


def build_datamodule(data_cfg: DictConfig, processor: Any, family: ModelFamily, **overrides: Any) -> Any:
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
        # The rank's GPU on its machine: LOCAL_RANK (Lightning's launcher, torchrun) or SLURM_LOCALID (a task per GPU).
        rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        return f"cuda:{gpu if gpu is not None else rank}"
    return "cpu"


def write_resolved_config(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return resolved


# --------------------------------------------------------------------------- resuming
# Keys that say where a run writes and how it is tracked, not what it trains: a run directory beside
# this one is resumed only where everything else of its config equals this run's.
NOT_THE_RECIPE = ("paths", "callbacks", "logger", "hydra", "resume", "ckpt_path", "sweep_name", "task_name")
STALE_RESULTS = ("metrics.json", "error.txt")


def resume_from(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint a run starts from: ``ckpt_path``, or with ``resume=auto`` the newest
    ``checkpoints/last.ckpt`` of this run directory, else of the newest unfinished run beside it
    with the same recipe (every setting but where it writes and how it is tracked: a sweep's job
    never resumes a sibling job's run); ``None`` for a fresh start."""
    resume, explicit = cfg.get("resume"), cfg.get("ckpt_path")
    if resume is None:
        return explicit
    if resume != "auto":
        raise ConfigError(f"resume={resume!r} must be auto or null (give a checkpoint itself with ckpt_path=...)")
    if explicit:
        raise ConfigError(f"resume=auto and ckpt_path={explicit!r} both say where to resume from: give one")
    own = output_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    wanted = _recipe(OmegaConf.to_container(cfg, resolve=True))
    runs = sorted((d for d in output_dir.parent.iterdir() if d.is_dir() and d != output_dir),
                  key=lambda d: d.stat().st_mtime, reverse=True) if output_dir.parent.is_dir() else []
    for run in runs:
        if (run / "checkpoints" / "last.ckpt").is_file() and not _completed(run) and _same_build(run, wanted):
            return str(run / "checkpoints" / "last.ckpt")
    log.info("resume=auto: no checkpoint to resume from in %s or beside it; starting from step 0", output_dir)
    return None


def _completed(run: Path) -> bool:
    import json

    try:
        return json.loads((run / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (resolved) without the keys that do not change what is trained."""
    recipe = {key: value for key, value in config.items() if key not in NOT_THE_RECIPE}
    if isinstance(recipe.get("trainer"), dict):
        recipe["trainer"] = {k: v for k, v in recipe["trainer"].items() if k != "default_root_dir"}
    return recipe


def _same_build(run: Path, wanted: dict[str, Any]) -> bool:
    try:
        config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)
    except (OSError, ValueError):
        return False
    return _recipe(config) == wanted


def set_aside_stale_results(output_dir: Path) -> Path | None:
    """Move an earlier job's ``metrics.json`` and ``error.txt`` out of a reused run directory (into
    ``previous/<n>/``), so what the directory holds is this job's; returns where they went."""
    stale = [output_dir / name for name in STALE_RESULTS if (output_dir / name).exists()]
    if not stale:
        return None
    number = len(list((output_dir / "previous").glob("*"))) if (output_dir / "previous").is_dir() else 0
    target = output_dir / "previous" / str(number)
    target.mkdir(parents=True)
    for path in stale:
        path.rename(target / path.name)
    return target


# --------------------------------------------------------------------------- planning
def gather_batches(
    cfg: DictConfig, calibration: CalibrationSettings, processor: Any, family: ModelFamily
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Calibration batches from the training shards (or ``calibration.urls``), held-out batches
    from the validation shards (or, without them, the training batches that follow)."""
    overrides = {"urls": calibration.urls} if calibration.urls else {}
    datamodule = build_datamodule(cfg.data, processor, family, **overrides)
    # Named in the DataError a stream without usable samples raises.
    key = "calibration.urls" if calibration.urls else "data.urls"
    calibration_batches = take_batches(datamodule.stream_dataloader(datamodule.urls, key), calibration.batches)
    if not calibration.fidelity_batches:
        return calibration_batches, []
    if datamodule.val_urls is not None:
        heldout = take_batches(
            datamodule.stream_dataloader(datamodule.val_urls, "data.val_urls"), calibration.fidelity_batches
        )
    else:
        heldout = take_batches(
            datamodule.stream_dataloader(datamodule.urls, key), calibration.fidelity_batches, skip=calibration.batches
        )
    return calibration_batches, heldout


def plan_for_run(
    cfg: DictConfig,
    family: ModelFamily,
    quant: QuantConfig,
    calibration: CalibrationSettings,
    checkpoint: str,
    processor: Any,
    device: str,
) -> Planning:
    """Planning as both entry points run it: batches gathered only when something is measured."""
    batches: tuple[list, list] = ([], [])
    if needs_measurement(quant, calibration):
        batches = gather_batches(cfg, calibration, processor, family)
    return plan_checkpoint(
        checkpoint,
        family,
        quant,
        calibration,
        calibration_batches=batches[0],
        heldout_batches=batches[1],
        device=device,
        attn_implementation=cfg.model.attn_implementation,
        cache_dir=Path(cfg.paths.cache_dir) / "calibration",
    )


# --------------------------------------------------------------------------- strategy
def shards_parameters(trainer_cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` shards the weights over the ranks (FSDP, whose units then need
    the 4-bit weights stored as the compute dtype); raises ``ConfigError`` for Lightning's plain
    ``fsdp`` names, which know nothing of a QLoRA model's units."""
    from hydra.utils import get_class
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, str):
        if strategy.startswith("fsdp"):
            raise ConfigError(f"trainer.strategy={strategy}: use trainer=fsdp, which wraps the model as QLoRA needs")
        return False
    if not OmegaConf.is_config(strategy) or "_target_" not in strategy:
        return False
    return issubclass(get_class(str(strategy._target_)), FSDPStrategy)


def build_strategy(trainer_cfg: DictConfig, family: ModelFamily, model: Any) -> Any | None:
    """``trainer.strategy`` built with what FSDP needs for this model (its units: the family's
    decoder layers and the LoRA matrices, see :func:`vlm.training.fsdp.fsdp_arguments`)
    where the config leaves them out; ``None`` leaves the strategy to the Trainer's config."""
    from vlm.training.fsdp import fsdp_arguments

    if not shards_parameters(trainer_cfg):
        return None
    node = trainer_cfg.strategy
    given = {k: v for k, v in fsdp_arguments(family.decoder_layer_classes(model)).items() if node.get(k) is None}
    return instantiate_checked(node, **given)


def build_optimizer(node: DictConfig, device: str, sharded: bool) -> Any:
    """The optimizer factory of ``node`` (a partial, called at fit time with the trainable parameters on
    ``device``). Under a strategy that shards the weights (``sharded``: FSDP) adamw's ``fused_8bit: auto`` is
    decided here (off, :meth:`~vlm.training.optim.AdamWSettings.resolved`): the parameters do not say so."""
    from hydra.utils import get_object, instantiate

    from vlm.training.optim import AdamWSettings, adamw

    if sharded and get_object(str(node._target_)) is adamw:
        values = {str(k): v for k, v in OmegaConf.to_container(node, resolve=True).items() if not str(k).startswith("_")}
        settings = AdamWSettings(**values)
        if settings.fused_8bit == "auto":
            return instantiate(node, fused_8bit=settings.resolved(device, sharded=True).fused_8bit)
    return instantiate(node)


# --------------------------------------------------------------------------- callbacks and loggers
def build_callbacks(cfg: DictConfig, facts: RunFacts, processor: Any = None) -> tuple[list[Any], Any | None]:
    """The configured callbacks, and among them the run summary (``callbacks.run_summary``; None
    where the config removed it); ``callbacks.generation`` gets ``processor``. Without the progress
    bar where ``trainer.enable_progress_bar=false``: Lightning refuses a progress bar callback then."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks.progress import ProgressBar

    handed: dict[str, dict[str, Any]] = {RUN_SUMMARY: {"facts": facts.as_dict()}, GENERATION: {"processor": processor}}
    callbacks, summary = [], None
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        # _convert_: what is handed in stays plain Python (a ListConfig would not load with weights_only).
        callback = instantiate(node, _convert_="all", **handed.get(key, {}))
        summary = callback if key == RUN_SUMMARY else summary
        callbacks.append(callback)
    if cfg.trainer.get("enable_progress_bar", True) is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks, summary


def build_loggers(cfg: DictConfig, plan: RunPlan) -> list[Any]:
    """The configured loggers; a W&B run is named after the job's overrides, grouped by its sweep
    (unless ``logger.wandb.group`` is set) and tagged with model, quant policy, rank and length."""
    from hydra.utils import instantiate

    loggers = []
    identity = plan.identity
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
