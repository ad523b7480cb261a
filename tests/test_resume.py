"""A killed run resumes exactly: `resume=auto` continues from the last checkpoint at the right
step, with the data stream where it was, and ends with the adapter an uninterrupted run ends with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

# 48 steps of 4 samples over 64 training samples: the stream passes its end and reshuffles, and
# a kill after the step-16 checkpoint lands mid-pass.
RUN = [
    "demo_data.n_train=64", "demo_data.n_val=16", "data.batch_size=4", "data.val_batch_size=8",
    "trainer.max_steps=48", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
    "calibration.measure=false", "logger=csv", "lora.dropout=0.1",
]


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "vlm.cli.train", f"hydra.run.dir={run_dir}", *RUN, *overrides]


def environment(tmp_path: Path) -> dict[str, str]:
    # One thread: the runs go on side by side (see ``runs``).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"), OMP_NUM_THREADS="1")
    return env


def start(run_dir: Path, env: dict[str, str], *overrides: str) -> subprocess.Popen:
    # Its own process group, as a scheduler's job step is: a signal reaches the DataLoader workers too.
    return subprocess.Popen(command(run_dir, *overrides), env=env, cwd=run_dir.parent, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def finish(run_dir: Path, env: dict[str, str], *overrides: str) -> dict:
    done = subprocess.run(command(run_dir, *overrides), env=env, cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@dataclass
class Interruption:
    """A run stopped by a signal, and what ``resume=auto`` then made of it."""

    run_dir: Path
    returncode: int  # the stopped run's exit code
    output: str  # the stopped run's screen
    metrics: dict | None  # the metrics.json the stopped run left (after a SIGTERM; a SIGKILL may cut it off)
    last_step: int  # the step of the checkpoints/last.ckpt it left
    resumed: dict  # the metrics.json of the resumed run


def interrupt_and_resume(run_dir: Path, signal_number: int, after_step: int, workers: int) -> Interruption:
    """The run, sent ``signal_number`` once its step-``after_step`` checkpoint is written, then resumed with
    ``resume=auto``; both with ``data.num_workers=workers``."""
    run_dir.mkdir(parents=True)
    env = environment(run_dir.parent)
    stopped = start(run_dir, env, f"data.num_workers={workers}")
    wait_for(run_dir / "checkpoints" / f"step-{after_step:06d}.ckpt", stopped)
    os.killpg(stopped.pid, signal_number)  # the whole job, DataLoader workers included
    output = stopped.communicate(timeout=120)[0]
    metrics = json.loads((run_dir / "metrics.json").read_text()) if signal_number == signal.SIGTERM else None
    last_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    resumed = finish(run_dir, env, f"data.num_workers={workers}", "resume=auto")
    return Interruption(run_dir, stopped.returncode, output, metrics, last_step, resumed)


# name → (the signal, the step checkpoint after which it arrives, the DataLoader workers).
INTERRUPTIONS = {
    "sigterm": (signal.SIGTERM, 8, 1),
    "killed, workers=0": (signal.SIGKILL, 16, 0),
    "killed, workers=1": (signal.SIGKILL, 16, 1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs.reference()`` → (run directory, metrics, environment) of the 48 steps run in one go;
    ``runs.interrupted(name)`` → the ``Interruption`` of each of ``INTERRUPTIONS``.

    All start with the first test that asks, in the background, two at a time side by side on one thread each,
    so that on two cores they take about half the time they take one after another; each is waited for where a
    test reads it.
    """
    root = tmp_path_factory.mktemp("uninterrupted")
    env = environment(root)
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(finish, root / "run", env)
        interrupted = {
            name: pool.submit(interrupt_and_resume, tmp_path_factory.mktemp("interrupted") / "run", *how)
            for name, how in INTERRUPTIONS.items()
        }
        yield SimpleNamespace(reference=lambda: (root / "run", reference.result(), env),
                              interrupted=lambda name: interrupted[name].result())


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_killed_mid_pass_resumes_at_its_step_and_ends_with_the_same_adapter(runs, workers):
    killed = runs.interrupted(f"killed, workers={workers}")
    run_dir, resumed_at, metrics = killed.run_dir, killed.last_step, killed.resumed
    assert 8 <= resumed_at < 48  # last.ckpt is written just after the step checkpoint

    assert metrics["status"] == "completed" and metrics["steps"] == 48
    assert metrics["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert metrics["total_samples"] == (48 - resumed_at) * 4  # the resumed run took exactly the missing steps
    reference_dir, reference, _ = runs.reference()
    ours, theirs = adapter(run_dir), adapter(reference_dir)
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(weight, theirs[name], rtol=0, atol=1e-6, msg=name)
    assert metrics["final_val_loss"] == pytest.approx(reference["final_val_loss"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes_from_it(runs):
    stopped = runs.interrupted("sigterm")
    run_dir, metrics, saved = stopped.run_dir, stopped.metrics, stopped.last_step
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.output[-3000:]
    assert metrics["status"] == "interrupted"
    assert saved == metrics["steps"] >= 8 and saved < 48

    resumed = stopped.resumed
    assert resumed["steps"] == 48 and resumed["total_samples"] == (48 - saved) * 4
    assert (run_dir / "previous" / "0" / "metrics.json").is_file()  # the interrupted job's, set aside
    reference_dir, _, _ = runs.reference()
    for name, weight in adapter(run_dir).items():
        torch.testing.assert_close(weight, adapter(reference_dir)[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_checkpoint_of_another_build_is_refused_saying_what_differs(runs, tmp_path, capsys):
    from composing import compose_small

    from vlm.cli.train import run_job

    reference_dir, _, env = runs.reference()
    checkpoint = reference_dir / "checkpoints" / "last.ckpt"
    # The job `vlm-train` runs, in process (the command's exit with code 2 itself is tested in test_config_checks).
    cfg = compose_small("train", tmp_path, *RUN, f"paths.cache_dir={env['VLM_CACHE_DIR']}", "lora.r=8",
                        f"ckpt_path={checkpoint}", run="other")
    with pytest.raises(SystemExit) as exited:
        run_job(cfg)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "another build" in error and "lora_r: 16 in the checkpoint, 8 now" in error


def test_resume_auto_picks_the_newest_unfinished_run_beside_it_with_the_same_recipe_only(tmp_path):
    from composing import compose_small
    from omegaconf import OmegaConf

    from vlm.cli.wiring import resume_from

    def earlier_run(name: str, *overrides: str, status: str | None = None) -> Path:
        cfg = compose_small("train", tmp_path / "runs", *overrides, run=name)
        run = Path(cfg.paths.output_dir)
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
        if status:
            (run / "metrics.json").write_text(json.dumps({"status": status}))
        time.sleep(0.01)  # distinct modification times: newest last
        return run

    same = earlier_run("a")
    earlier_run("b", "optimizer.lr=1e-3")  # another recipe: a sibling job of a sweep over lr
    earlier_run("c", status="completed")  # finished: nothing to resume
    this = compose_small("train", tmp_path / "runs", "resume=auto", run="new")
    assert resume_from(this, Path(this.paths.output_dir)) == str(same / "checkpoints" / "last.ckpt")
    fresh = compose_small("train", tmp_path / "runs", "resume=auto", "lora.r=4", run="new")
    assert resume_from(fresh, Path(fresh.paths.output_dir)) is None
