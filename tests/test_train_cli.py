"""`vlm-train` end to end on the CPU: config validation, the demo recipe, run outputs, W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from composing import compose_small
from hydra.errors import MissingConfigException

from vlm.cli.train import train
from vlm.configs import config_dir
from vlm.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
# On PYTHONPATH, makes bitsandbytes take the path of a CPU without AVX512-BF16 (see its docstring).
WITHOUT_AVX512_BF16 = Path(__file__).parent / "without_avx512_bf16"
CPU_PATHS = ["as_found", "without_avx512_bf16"]


def compose_train(tmp_path: Path, *overrides: str):
    """The real train config, sized to seconds."""
    small = [
        "data.val_batch_size=8",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    return compose_small("train", tmp_path, *small, *overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    assert cfg.model.family and cfg.data.max_seq_length > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=0", r"lora\.r=0"),
        ("model.family=gpt2", r"model\.family='gpt2'.*known: "),
        ("quant.method=nf3", r"quant\.method='nf3'"),
        ("data.max_seq_length=1", r"data\.max_seq_length=1 cannot hold one image"),
    ],
)
def test_invalid_values_fail_before_any_weights_load_naming_the_key(override, message, tmp_path, monkeypatch):
    import vlm.models.loading as loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded despite an invalid config")

    monkeypatch.setattr(loading, "load_model", no_weights)
    cfg = compose_train(tmp_path, override, "logger=csv")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_an_unknown_model_config_is_refused_with_the_available_ones(tmp_path):
    with pytest.raises(MissingConfigException, match="model/llava_99b"):
        compose_train(tmp_path, "model=llava_99b")


def test_demo_run_writes_metrics_adapter_checkpoint_and_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_train(tmp_path, "logger.wandb.name=cli-test")
    summary = train(cfg)
    run = tmp_path / "run"

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == summary and metrics["status"] == "completed"
    for key in ("first_train_loss", "last_train_loss", "initial_val_loss", "final_val_loss", "tokens_per_s",
                "peak_memory_bytes", "wall_time_s", "trainable_params", "quantized_linear_layers"):
        assert metrics[key] is not None, key
    assert metrics["steps"] == 4 and metrics["quantized_linear_layers"] == 24
    assert metrics["peak_memory_bytes"] > 0 and metrics["tokens_per_s"] > 0

    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert (run / "checkpoints" / "last.ckpt").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["paths"]["output_dir"] == str(run) and "${" not in (run / "config.yaml").read_text()

    # W&B ran offline and its run directory holds the resolved config and a history.
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert yaml.safe_load((offline_runs[0] / "files" / "vlm_config.yaml").read_text()) == resolved
    (log,) = offline_runs[0].glob("run-*.wandb")
    records = log.read_bytes()  # the run's log of protobuf records: config and history as JSON text
    assert b'"family": "qwen2_vl"' in records or b'"family":"qwen2_vl"' in records
    assert b"train/loss" in records and b"val/loss" in records

    # Every run reports its quantization: per-layer errors, memory, and fidelity of the loaded model.
    report = json.loads((run / "quant_report.json").read_text())
    assert report["policy"] == "standard" and report["quantized_layers"] == 24
    assert len(report["layers"]) == 24 and all(layer["output_error"] for layer in report["layers"])
    assert report["memory"]["loaded_bytes"] == report["memory"]["planned_bytes"]
    assert set(report["fidelity"]) == {"policy", "loaded"}
    assert report["fidelity"]["loaded"]["kl"] == pytest.approx(report["fidelity"]["policy"]["kl"], rel=1e-6)
    assert (run / "quant_report.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["weight_bytes"] == report["memory"]["loaded_bytes"]
    assert metrics["checkpointing"] == "standard"  # how activations were kept: an ablation's axis
    # The defaults (model.compile=auto, kernels=auto) as the CPU decided them: what ran, not what was asked.
    assert resolved["model"]["compile"] == "auto" and resolved["kernels"]["cross_entropy"] == "auto"
    assert metrics["compile"] == "none" and metrics["kernels"] == {}
    assert list(offline_runs[0].glob("files/media/images/quant/report*.png"))
    assert list(offline_runs[0].glob("files/media/table/quant/layers*.table.json"))


def cpu_path_env(tmp_path: Path, cpu_path: str) -> dict[str, str]:
    """A user's environment (no W&B key, a fresh cache), with bitsandbytes on ``cpu_path``."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_SILENT", "TRITON_INTERPRET")}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"))
    if cpu_path == "without_avx512_bf16":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WITHOUT_AVX512_BF16), env.get("PYTHONPATH")]))
        probe = "import bitsandbytes.functional as F, bitsandbytes.nn as nn; print(F.has_avx512bf16(), nn.Linear4bit(64, 64).support_avx512bf16_for_cpu)"
        answer = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert answer.stdout.split() == ["False", "False"], answer
    return env


@pytest.fixture(scope="module")
def readme_demos(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """``cpu_path`` → (the directory it ran in, the finished process) of `vlm-train` exactly as the Quickstart runs
    it (the installed command, from a directory outside the project, with no W&B key), on this CPU's bitsandbytes
    path and on the other one. The two run side by side, on one thread each: the tiny model gains nothing from a
    second, and on two cores the pair takes the time of one."""

    def readme_demo(cpu_path: str) -> tuple[Path, subprocess.CompletedProcess]:
        cwd = tmp_path_factory.mktemp(f"readme-{cpu_path}")
        env = {**cpu_path_env(cwd, cpu_path), "OMP_NUM_THREADS": "1"}
        command = str(Path(sys.executable).with_name("vlm-train"))
        return cwd, subprocess.run([command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(len(CPU_PATHS)) as pool:
        return dict(zip(CPU_PATHS, pool.map(readme_demo, CPU_PATHS), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_the_readme_demo_learns_and_its_screen_shows_the_run_and_no_warning(readme_demos, cpu_path):
    """The Quickstart's `vlm-train` (see ``readme_demos``) on either bitsandbytes path."""
    cwd, done = readme_demos[cpu_path]
    screen = done.stdout + done.stderr
    assert done.returncode == 0, screen[-3000:]

    (run,) = (cwd / "outputs" / "train" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 100
    assert metrics["final_val_loss"] < 0.7 * metrics["initial_val_loss"]

    assert "warn" not in screen.lower(), screen
    assert "Epoch" not in screen and "it/s" not in screen  # Lightning's per-epoch bars
    (offline,) = (run / "wandb").glob("offline-run-*")
    lines = screen.splitlines()
    assert lines[0] == f"vlm-train → {run}"
    assert "  data     train 8 shards, 2000 samples; validation 8 shards, 128 samples; batch 8, up to 256 tokens" in lines
    assert "step 100/100" in screen
    (done_line,) = [line for line in lines if line.startswith("done in ")]
    assert done_line.endswith(f"→ {run}")
    assert "W&B is offline" in screen
    assert f"  W&B         wandb sync {offline}" in lines[lines.index(done_line):]
