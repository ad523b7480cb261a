"""Composing the real Hydra configs for tests: run outputs, caches and demo data under a temp dir."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from vlm.configs import config_dir, register_resolvers


def compose_small(config_name: str, tmp_path: Path, *overrides: str, run: str = "run"):
    """``config_name`` (``train``, ``quantize``) with everything under ``tmp_path`` and a demo set of seconds."""
    register_resolvers()
    small = [
        f"paths.output_dir={tmp_path / run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "demo_data.n_train=64",
        "demo_data.n_val=16",
        "data.batch_size=4",
        "data.num_workers=0",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name, overrides=[*small, *overrides])
