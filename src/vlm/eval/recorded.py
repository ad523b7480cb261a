"""Settings a run directory recorded beyond what :class:`~vlm.build.trained.TrainedRun` holds: how it
validated (precision, batch size) and how it was tracked (its W&B project, name and group)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm.build.trained import CONFIG_FILE, METRICS_FILE


def recorded_setting(run_dir: str | Path, key: str, default: Any = None) -> Any:
    """The value of the dotted ``key`` (``trainer.precision``) in the run's ``config.yaml``; ``default``
    when the file or the key is missing or null."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return default
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(path), key, default=None)
    return default if value is None else value


def recorded_metric(run_dir: str | Path, key: str, default: Any = None) -> Any:
    """The value of ``key`` in the run's ``metrics.json``; ``default`` when missing or null."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return default
    value = json.loads(path.read_text()).get(key)
    return default if value is None else value
