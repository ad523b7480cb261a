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


# Two steps of four samples on the shards, read in order, without the calibration pass.
SHARDS_RUN = [
    "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=0",
    "trainer.max_steps=2", "calibration.measure=false", "logger=csv",
]  # fmt: skip


def train_on_shards(tmp_path: Path, urls: list, *overrides: str) -> dict:
    """``vlm-train data=webdataset`` on ``urls`` in a process of its own, two steps of four samples,
    read in order; returns its ``metrics.json`` (the run must succeed)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"))
    command = [
        sys.executable, "-m", "vlm.cli.train",
        f"hydra.run.dir={tmp_path / 'run'}",
        "data=webdataset", f"data.urls=[{','.join(map(str, urls))}]", *SHARDS_RUN, *overrides,
    ]  # fmt: skip
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def train_on_shards_in_process(tmp_path: Path, urls: list, *overrides: str) -> dict:
    """The run of ``train_on_shards``, by calling ``vlm-train``'s ``train`` here: where what is tested is the
    training, not the command line, this saves starting a process. Returns its ``metrics.json``."""
    import json

    from vlm.cli.train import train

    register_resolvers()
    where = [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    data = ["data=webdataset", f"data.urls=[{','.join(map(str, urls))}]"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*where, *data, *SHARDS_RUN, *overrides])
    assert train(cfg)["status"] == "completed"
    return json.loads((tmp_path / "run" / "metrics.json").read_text())
