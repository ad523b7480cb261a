"""Sweeps: every job of a multirun trains, is tracked and reported; a failing job is recorded and
does not stop the others; the Optuna preset searches; launchers compose for one machine and SLURM."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from vlm.cli.sweep_report import main as sweep_report
from vlm.configs import config_dir, register_resolvers
from vlm.sweeps.jobs import claimed_gpu, record_failure, run_name, swept_keys
from vlm.sweeps.report import collect, table

# A demo run of seconds: small data, four steps, no calibration pass before loading.
SMALL_JOB = [
    "demo_data.n_train=48", "demo_data.n_val=16", "data.batch_size=4", "data.val_batch_size=8",
    "data.num_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "calibration.measure=false",
]


def multirun(tmp_path: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "vlm.cli.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL_JOB, *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def side_by_side(tmp_path_factory, **sweeps: list[str]) -> dict[str, tuple[subprocess.CompletedProcess, Path, float]]:
    """name → (the finished multirun, its sweep directory, its seconds) of each sweep, each in a directory of its
    own, all started together on one thread each: the tiny model gains nothing from a second thread, and on two
    cores two sweeps take the time of one."""

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path, float]:
        tmp_path = tmp_path_factory.mktemp(name)
        started = time.perf_counter()
        done = multirun(tmp_path, *sweeps[name])
        return done, tmp_path / "sweep", time.perf_counter() - started

    with ThreadPoolExecutor(len(sweeps)) as pool:
        return dict(zip(sweeps, pool.map(run, sweeps), strict=True))


@pytest.fixture(scope="module")
def grid_sweeps(tmp_path_factory):
    """``rank_vs_policy``: the 2x2 of lora.r and quant, tracked in W&B (offline). ``failing_job``: three ranks, the
    middle one invalid, six steps validating every 50 (so the interval misses the last step)."""
    return side_by_side(
        tmp_path_factory,
        rank_vs_policy=["lora.r=4,8", "quant=nf4,bridge_skip", "sweep_name=rank-vs-policy"],
        failing_job=["lora.r=4,-1,8", "optimizer.lr=3e-3", "trainer.max_steps=6", "trainer.val_check_interval=50",
                     "logger=csv"],
    )


@pytest.fixture(scope="module")
def optuna_sweeps(tmp_path_factory):
    """The Optuna preset: ``trials``, three that train; ``failed_trials``, two whose every job fails (a sequence
    length too short for one image), with failures allowed."""
    return side_by_side(
        tmp_path_factory,
        trials=["hparams_search=optuna", "hydra.sweeper.n_trials=3", "logger=csv"],
        failed_trials=["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1.0",
                       "data.max_seq_length=1", "logger=csv"],
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_2x2_sweep_gives_each_job_its_directory_wandb_run_and_a_row(grid_sweeps):
    done, sweep, seconds = grid_sweeps["rank_vs_policy"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 180

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        r, quant = overrides["lora.r"], overrides["quant"]
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["final_val_loss"] is not None
        assert metrics["run_name"] == f"lora.r={r},quant={quant}" and metrics["sweep"] == "rank-vs-policy"
        seen.add((r, quant))

        (run,) = (job / "wandb").glob("offline-run-*")
        config = yaml.safe_load((run / "files" / "vlm_config.yaml").read_text())
        assert config["lora"]["r"] == int(r)
        assert config["quant"]["policy"] == {"nf4": "standard", "bridge_skip": "bridge_skip"}[quant]
        records = next(run.glob("run-*.wandb")).read_bytes()
        assert b"rank-vs-policy" in records  # the group
        assert f"lora.r={r},quant={quant}".encode() in records  # the run name
        assert f"quant={quant}".encode() in records and f"r={r}".encode() in records  # tags
        assert b"train/loss" in records and b"val/loss" in records  # a history
    assert seen == {("4", "nf4"), ("4", "bridge_skip"), ("8", "nf4"), ("8", "bridge_skip")}

    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 4 and {row["status"] for row in rows} == {"completed"}
    assert {(row["lora.r"], row["quant"]) for row in rows} == seen
    assert all(float(row["final_val_loss"]) > 0 for row in rows)
    assert "Lowest final validation loss" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "4 jobs: 4 completed" in done.stdout


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_others_finish(grid_sweeps):
    done, sweep, _ = grid_sweeps["failing_job"]
    assert done.returncode == 3, done.stderr[-3000:]  # the sweep ran to the end, then said so
    assert "1 of 3 jobs did not complete" in done.stderr

    failed = json.loads((sweep / "1" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "lora.r=-1 must be a positive integer" in failed["error"]
    assert "ConfigError" in (sweep / "1" / "error.txt").read_text()
    rows = read_csv(sweep / "summary.csv")
    assert [(row["lora.r"], row["status"]) for row in rows] == [("4", "completed"), ("-1", "failed"), ("8", "completed")]
    assert "lora.r=-1 must be a positive integer" in rows[1]["error"]
    assert "job 1 (failed): ConfigError: lora.r=-1" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_the_optuna_preset_runs_trials_over_lr_rank_and_dropout(optuna_sweeps):
    done, sweep, _ = optuna_sweeps["trials"]
    assert done.returncode == 0, done.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optimizer.lr", "lora.r", "lora.dropout"}
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 3 and {row["status"] for row in rows} == {"completed"}
    assert len({row["optimizer.lr"] for row in rows}) == 3  # each trial tried its own values
    assert results["best_value"] == pytest.approx(min(float(row["final_val_loss"]) for row in rows), rel=1e-6)
    assert "Optuna's best trial" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_failed_optuna_trials_are_told_to_optuna_as_failed_and_recorded(optuna_sweeps):
    done, sweep, _ = optuna_sweeps["failed_trials"]
    # Optuna's sweeper logs each failed trial; with none completed, it then has no best trial to
    # report and ends the sweep with that error (its own limit), so the exit code is not 0.
    output = done.stdout + done.stderr
    assert output.count("Failed experiment") == 2, output[-3000:]
    assert "Values cannot be specified" not in output and done.returncode != 0
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "failed" and "data.max_seq_length=1 cannot hold one image" in metrics["error"]


def test_run_names_keep_what_the_sweep_varies(tmp_path):
    overrides = ["lora.r=8", "quant=nf4", "trainer.max_steps=4", "paths.cache_dir=/x"]
    assert run_name(overrides, "train", swept={"lora.r", "quant"}) == "lora.r=8,quant=nf4"
    assert run_name(overrides, "train") == "lora.r=8,quant=nf4,trainer.max_steps=4"
    assert run_name(["paths.cache_dir=/x"], "train") == "train"

    multirun_yaml = {
        "hydra": {
            "overrides": {"task": ["lora.r=8,16", "quant=nf4", "data.max_seq_length=range(256,1025,256)"]},
            "sweeper": {"params": {"optimizer.lr": "interval(1e-5, 1e-2)"}},
        }
    }
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun_yaml))
    assert swept_keys(tmp_path) == {"lora.r", "data.max_seq_length", "optimizer.lr"}


def test_jobs_sharing_a_machine_take_different_gpus_and_wait_when_all_are_taken(tmp_path):
    locks = tmp_path / "locks"
    with claimed_gpu(locks, count=2, preferred=0) as first, claimed_gpu(locks, count=2, preferred=0) as second:
        assert {first, second} == {0, 1}
        got: list[int] = []
        waiting = threading.Thread(target=lambda: got.append(_claim_and_release(locks)))
        waiting.start()
        time.sleep(0.3)
        assert not got  # both GPUs busy: the third job waits
    waiting.join(timeout=5)
    assert got and got[0] in (0, 1)


def _claim_and_release(locks: Path) -> int:
    with claimed_gpu(locks, count=2, preferred=1, poll_s=0.05) as index:
        return index


@pytest.mark.slow
def test_final_validation_losses_come_from_the_last_step_even_when_the_interval_misses_it(grid_sweeps):
    _, sweep, _ = grid_sweeps["failing_job"]  # its completed jobs
    rows = [row for row in read_csv(sweep / "summary.csv") if row["status"] == "completed"]
    assert [row["lora.r"] for row in rows] == ["4", "8"]
    finals = [float(row["final_val_loss"]) for row in rows]
    initials = {float(row["initial_val_loss"]) for row in rows}
    assert len(initials) == 1  # the same untrained model...
    assert all(final < min(initials) for final in finals)  # ...validated again after its last step
    assert len(set(finals)) == 2
    for job in ("0", "2"):  # the completed jobs
        history = json.loads((sweep / job / "metrics.json").read_text())["val_loss_history"]
        assert history[-1]["step"] == 6


def test_a_failure_keeps_what_training_wrote_and_adds_the_error(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "failed", "first_train_loss": 5.0}))
    try:
        raise MemoryError("CUDA out of memory")
    except MemoryError as error:
        record_failure(tmp_path, error)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"status": "failed", "first_train_loss": 5.0, "error": "MemoryError: CUDA out of memory"}
    assert "Traceback" in (tmp_path / "error.txt").read_text()


def write_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_the_report_command_lists_every_job_unfinished_ones_too(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done = {"status": "completed", "final_val_loss": 1.5, "peak_memory_bytes": 2 * 1024**3, "quant_policy": "standard", "lora_r": 8}
    write_job(sweep, "0", ["lora.r=8", "quant=nf4"], done)
    write_job(sweep, "1", ["lora.r=16", "quant=nf4"], {**done, "final_val_loss": 1.2, "lora_r": 16})
    write_job(sweep, "2", ["lora.r=64", "quant=nf4"], None)  # killed before writing anything
    write_job(sweep, "10", ["lora.r=4", "quant=nf4"], {"status": "failed", "error": "OutOfMemoryError: CUDA"})

    assert sweep_report([str(sweep)]) == 0
    assert [row.job for row in collect(sweep)] == ["0", "1", "2", "10"]  # numeric job order
    rows = read_csv(sweep / "summary.csv")
    assert [row["status"] for row in rows] == ["completed", "completed", "incomplete", "failed"]
    assert rows[0]["peak_memory_gib"] == "2.0" and "quant" not in rows[0]  # only what varied
    assert "no metrics.json" in rows[2]["error"] and rows[3]["error"] == "OutOfMemoryError: CUDA"
    summary = (sweep / "summary.md").read_text()
    assert "Lowest final validation loss: 1.2 (job 1: lora.r=16)" in summary
    assert "4 jobs: 2 completed, 1 failed, 1 incomplete" in capsys.readouterr().out

    assert sweep_report([str(tmp_path / "nowhere")]) == 2
    header, _ = table(collect(sweep))
    assert header[:3] == ["job", "status", "lora.r"]


def test_only_a_completed_job_can_be_named_best(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep, "0", ["lora.r=8"], {"status": "failed", "final_val_loss": 0.5, "error": "RuntimeError: boom"})
    write_job(sweep, "1", ["lora.r=16"], {"status": "failed", "final_val_loss": 0.7, "error": "RuntimeError: boom"})
    assert sweep_report([str(sweep)]) == 0
    assert "Lowest final validation loss" not in (sweep / "summary.md").read_text()

    write_job(sweep, "2", ["lora.r=32"], {"status": "completed", "final_val_loss": 0.9})
    assert sweep_report([str(sweep)]) == 0
    assert "Lowest final validation loss: 0.9 (job 2: lora.r=32)" in (sweep / "summary.md").read_text()


def test_launchers_compose_for_one_machine_and_for_slurm():
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        slurm = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60"], return_hydra_config=True)
        local = compose("train", ["hydra/launcher=local_gpus"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (slurm.hydra.launcher.partition, slurm.hydra.launcher.gpus_per_node, slurm.hydra.launcher.timeout_min) == ("gpu", 1, 60)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs >= 1
