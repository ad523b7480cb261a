"""A run's evaluation scores into its W&B run, as summary keys ``eval/loss``, ``eval/perplexity``,
``eval/exact_match`` and ``eval/token_f1`` (and ``eval/samples``).

Online, the run's W&B run is resumed (``resume="allow"`` with its id) and its summary gains the keys.
Offline, W&B cannot resume a run: it ignores ``resume`` and has no way to open the local records of
a finished run for writing. So the scores go into a new offline run *with the training run's id*
(in the same ``wandb/`` folder of the run directory, under the same project, name and group):
``wandb sync`` uploads the folders of one id in the order they started, the training run's first,
so the evaluation's summary lands in the training's run. A run directory without any W&B run gets
a new one named after the run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlm.eval.recorded import recorded_metric, recorded_setting

SUMMARY_KEYS = ("loss", "perplexity", "exact_match", "token_f1", "samples")
_RUN_FOLDER = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-")


def summary_of(scores: dict[str, Any]) -> dict[str, Any]:
    """The ``eval/...`` summary of a row of ``eval.json`` (keys without a value are left out)."""
    return {f"eval/{key}": scores[key] for key in SUMMARY_KEYS if scores.get(key) is not None}


def training_run_id(run_dir: str | Path) -> str | None:
    """The id of the W&B run that trained ``run_dir``: that of its oldest run folder in ``wandb/``."""
    wandb_dir = Path(run_dir) / "wandb"
    if not wandb_dir.is_dir():
        return None
    folders = sorted(p for p in wandb_dir.iterdir() if p.is_dir() and _RUN_FOLDER.match(p.name))
    for folder in folders:  # the records file names the id; a folder name may carry a "-1" suffix
        records = sorted(folder.glob("run-*.wandb"))
        if records:
            return records[0].stem.removeprefix("run-")
    return None


def log_summary(run_dir: str | Path, scores: dict[str, Any], offline: bool) -> Path:
    """Write ``scores`` (a row of ``eval.json``) into the W&B run of ``run_dir``; returns the W&B run's folder."""
    import wandb

    run_dir = Path(run_dir)
    run_id = training_run_id(run_dir)
    # The name training gave its W&B run (the job's name in a sweep).
    name = recorded_metric(run_dir, "run_name") or recorded_setting(run_dir, "logger.wandb.name") or run_dir.name
    options: dict[str, Any] = {
        "dir": str(run_dir),
        "project": recorded_setting(run_dir, "logger.wandb.project", "vlm"),
        "name": name,
        "group": recorded_setting(run_dir, "logger.wandb.group"),
        "mode": "offline" if offline else "online",
    }
    if run_id is not None:
        options["id"] = run_id
        if not offline:
            options["resume"] = "allow"
    run = wandb.init(**options)
    try:
        run.summary.update(summary_of(scores))
    finally:
        run.finish()
    return Path(run.dir).parent
