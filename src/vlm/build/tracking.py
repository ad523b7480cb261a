"""What a run sends to W&B besides Lightning's metrics: its resolved config, its quantization
report, and where an offline run lies; and finishing the runs, also after a failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlm.quant.report import QuantReport


def wandb_runs(loggers: list[Any]) -> list[Any]:
    """The W&B runs of ``loggers`` (created here if a logger has not started its run yet)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]


def save_config(loggers: list[Any], resolved: dict[str, Any]) -> None:
    """Keep the resolved config as a file of each W&B run too; offline runs hold it then, and sync it."""
    for run in wandb_runs(loggers):
        path = Path(run.dir) / "vlm_config.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        run.save(str(path), base_path=run.dir, policy="now")


def offline_run_dirs(loggers: list[Any]) -> list[Path]:
    """The ``offline-run-*`` folder of each offline W&B run: what ``wandb sync`` takes."""
    return [Path(run.dir).parent for run in wandb_runs(loggers) if run.offline]


def publish_quant_report(report: QuantReport, output_dir: Path, loggers: list[Any], top: int = 15) -> Path:
    """Write the report files, print the table of the ``top`` layers, and log both to W&B where it is on."""
    json_path, png_path = report.write(output_dir)
    report.print(top=top)
    log_quant_report(loggers, report, json_path, png_path)
    return json_path


def log_quant_report(loggers: list[Any], report: QuantReport, json_path: Path, png_path: Path) -> None:
    """The layer table, the plot and the headline numbers of ``report`` into each W&B run."""
    runs = wandb_runs(loggers)
    if not runs:
        return
    import wandb

    rows = report.layer_rows()
    columns = list(rows[0]) if rows else []
    for run in runs:
        table = wandb.Table(columns=columns, data=[[_cell(row[c]) for c in columns] for row in rows])
        run.log({"quant/layers": table, "quant/report": wandb.Image(str(png_path))})
        run.summary.update(_flat_summary(report))
        run.save(str(json_path), base_path=str(json_path.parent), policy="now")


def finish_runs() -> None:
    """Finish the W&B run of this process, if one was started, so its directory is complete."""
    import sys

    wandb = sys.modules.get("wandb")  # not imported: no run was started
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()


def _cell(value: Any) -> Any:
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def _flat_summary(report: QuantReport) -> dict[str, Any]:
    summary = {f"quant/memory/{key}": value for key, value in report.to_dict()["memory"].items()}
    for label, score in report.fidelity.items():
        summary[f"quant/fidelity/{label}/kl"] = score.kl
        summary[f"quant/fidelity/{label}/top1_agreement"] = score.top1_agreement
    summary["quant/kept_in_16bit"] = len(report.plan.kept)
    return summary
