"""What a user sees in the terminal: the run's plan before it starts, its result when it ends, and
none of the notices that the libraries underneath print about themselves.

Each notice silenced here is named, with the reason it says nothing about the run; everything
else the libraries warn about still shows.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

# (category, message regex, why it is silenced)
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT reads transformers' old attribute name; nothing of ours uses it"),
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's own use of a torch API, once per process"),
    (Warning, r"A FSDP `auto_wrap_policy` is set, but the model is already wrapped",
     "VisionLanguageFineTuner.configure_model wraps the model by that very policy"),
)


# wandb.init warns of a setting that Lightning's WandbLogger always passes, even unset.
WANDB_ANONYMOUS_NOTICE = "wandb: WARNING The anonymous setting has no effect"


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_messages(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessages) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(DropMessages(prefix))


def quiet_libraries() -> None:
    """Silence the notices named in this module; call first thing in an entry point, before
    bitsandbytes is imported (it logs its notice while being imported)."""
    from vlm.quant.bnb_layers import CPU_KERNEL_NOTICES

    for logger_name, prefix in CPU_KERNEL_NOTICES:
        drop_messages(logger_name, prefix)
    for category, message, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # W&B's banner and run history: the run's own summary says where the W&B run is. Its
    # messages go through a logger (so the run's log file has them) instead of to the terminal.
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:  # a machine without W&B logs with logger=csv; nothing of W&B to quiet then
        wandb = None
    if wandb is not None:
        drop_messages("wandb.terminal", WANDB_ANONYMOUS_NOTICE)
        wandb.termsetup(wandb.Settings(silent=True), logging.getLogger("wandb.terminal"))
    # Lightning installs its own log handlers when imported; imported here, before Hydra configures
    # logging, they are replaced by the run's (conf/hydra/default.yaml) instead of printing twice.
    import lightning  # noqa: F401
    import transformers

    # Bars for writing and loading tiny checkpoints in well under a second: the run's one bar is training's.
    transformers.utils.logging.disable_progress_bar()


class ConsoleFormatter(logging.Formatter):
    """Information as plain lines; warnings and errors with their level and where they come from."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()} ({record.name}): {message}"
        return message


def _console() -> Any:
    from rich.console import Console

    # soft_wrap: a path is never broken over two lines, so it can be copied.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def group_choice(group: str) -> str | None:
    """The option picked for a config group (``model=tiny_qwen2_vl``), where Hydra composed the config."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def run_header(cfg: DictConfig) -> list[str]:
    """The resolved choices of a training run, one line per part (the data follow once read)."""
    model, quant, lora, trainer = cfg.model, cfg.quant, cfg.lora, cfg.trainer
    checkpoint = model.get("checkpoint") or "a tiny random-init checkpoint built locally"
    switches = [(name, on) for name, on in (cfg.get("kernels") or {}).items() if name != "_target_"]
    kernels = [name for name, on in switches if on is True]
    automatic = [name for name, on in switches if on == "auto"]
    if automatic:
        kernels.append(f"{', '.join(automatic)} on CUDA only (auto)")
    validating = cfg.data.get("val_urls") and trainer.get("val_check_interval")
    return [
        f"model    {group_choice('model') or model.family}: {model.family}, {checkpoint}",
        f"quant    {quant.method}, policy {quant.policy}" + (f", skip {list(quant.skip_modules)}" if quant.get("skip_modules") else ""),
        f"lora     r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, targets {lora.target_modules}",
        f"kernels  {', '.join(kernels) or 'none'}",
        f"trainer  {trainer.get('accelerator', 'auto')}, {trainer.get('precision')}, {trainer.get('max_steps')} steps"
        + (f", validating every {trainer.val_check_interval}" if validating else ""),
        f"seed     {cfg.seed}",
    ]


def data_line(data: DictConfig, train: str, val: str | None) -> str:
    """``train``/``val``: what the shards hold (:meth:`vlm.data.inventory.ShardInventory.describe`)."""
    held = f"train {train}; " + (f"validation {val}" if val else "no validation")
    return f"data     {held}; batch {data.batch_size}, up to {data.max_seq_length} tokens"


def print_run_header(cfg: DictConfig, resuming: str | None = None) -> None:
    console = _console()
    console.print(f"[bold]vlm-train[/bold] → {cfg.paths.output_dir}")
    for line in run_header(cfg):
        console.print(f"  {line}")
    if resuming:
        console.print(f"  resume   from {resuming}")


def print_data_summary(data: DictConfig, train: str, val: str | None) -> None:
    _console().print(f"  {data_line(data, train, val)}")


def print_wandb_offline(dirs: list[Path]) -> None:
    for folder in dirs:
        _console().print(f"W&B is offline (no API key): upload the run later with `wandb sync {folder}`")


def _loss_line(name: str, first: Any, last: Any) -> str | None:
    if first is None or last is None:
        return None
    change = f" ({(last - first) / first:+.1%})" if first else ""
    return f"{name:<12}{first:.4g} → {last:.4g}{change}"


def final_summary(summary: Mapping[str, Any], output_dir: Path, offline_dirs: list[Path]) -> list[str]:
    """What a finished run says about itself: losses, speed, memory, and where everything is."""
    from vlm.quant.memory import human_bytes

    lines = [
        _loss_line("val loss", summary.get("initial_val_loss"), summary.get("final_val_loss")),
        _loss_line("train loss", summary.get("first_train_loss"), summary.get("last_train_loss")),
    ]
    speed = summary.get("tokens_per_s")
    if speed is not None:
        peak = summary.get("peak_memory_bytes")
        lines.append(f"{'throughput':<12}{speed:,.0f} tokens/s" + (f", peak memory {human_bytes(peak)}" if peak else ""))
    skipped = summary.get("skipped_samples") or {}
    if skipped:
        lines.append(f"{'skipped':<12}" + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    present = [name for name in ("metrics.json", "config.yaml", "adapter", "checkpoints", "quant_report.json", "csv")
               if (output_dir / name).exists()]
    lines.append(f"{'files':<12}" + ", ".join(present))
    lines.extend(f"{'W&B':<12}wandb sync {folder}" for folder in offline_dirs)
    return [line for line in lines if line is not None]


def print_final_summary(summary: Mapping[str, Any], output_dir: Path, offline_dirs: list[Path]) -> None:
    console = _console()
    wall = summary.get("wall_time_s")
    console.print("[bold]done[/bold]" + (f" in {wall:.0f} s" if wall else "") + f" → {output_dir}")
    for line in final_summary(summary, output_dir, offline_dirs):
        console.print(f"  {line}")

