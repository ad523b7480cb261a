"""A killed run resumes exactly: `resume=auto` continues from the last checkpoint at the right
step, with the data stream where it was, and ends with the adapter an uninterrupted run ends with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"))
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    env = environment(root)
    metrics = finish(root / "run", env)
    return root / "run", metrics, env


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_killed_mid_pass_resumes_at_its_step_and_ends_with_the_same_adapter(uninterrupted, tmp_path, workers):
    reference_dir, reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = environment(tmp_path)
    killed = start(run_dir, env, f"data.num_workers={workers}")
    wait_for(run_dir / "checkpoints" / "step-000016.ckpt", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    resumed_at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert 8 <= resumed_at < 48  # last.ckpt is written just after the step checkpoint

    metrics = finish(run_dir, env, f"data.num_workers={workers}", "resume=auto")
    assert metrics["status"] == "completed" and metrics["steps"] == 48
    assert metrics["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert metrics["total_samples"] == (48 - resumed_at) * 4  # the resumed run took exactly the missing steps
    ours, theirs = adapter(run_dir), adapter(reference_dir)
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(weight, theirs[name], rtol=0, atol=1e-6, msg=name)
    assert metrics["final_val_loss"] == pytest.approx(reference["final_val_loss"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes_from_it(uninterrupted, tmp_path):
    reference_dir, _, _ = uninterrupted
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = environment(tmp_path)
    stopped = start(run_dir, env, "data.num_workers=1")
    wait_for(run_dir / "checkpoints" / "step-000008.ckpt", stopped)
    os.killpg(stopped.pid, signal.SIGTERM)  # the whole job, DataLoader workers included
    output = stopped.communicate(timeout=120)[0]
    assert stopped.returncode == 128 + signal.SIGTERM, output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    saved = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert saved == metrics["steps"] >= 8 and saved < 48

    resumed = finish(run_dir, env, "data.num_workers=1", "resume=auto")
    assert resumed["steps"] == 48 and resumed["total_samples"] == (48 - saved) * 4
    assert (run_dir / "previous" / "0" / "metrics.json").is_file()  # the interrupted job's, set aside
    for name, weight in adapter(run_dir).items():
        torch.testing.assert_close(weight, adapter(reference_dir)[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_checkpoint_of_another_build_is_refused_saying_what_differs(uninterrupted, tmp_path):
    reference_dir, _, env = uninterrupted
    checkpoint = reference_dir / "checkpoints" / "last.ckpt"
    done = subprocess.run(command(tmp_path / "other", "lora.r=8", f"ckpt_path={checkpoint}"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "another build" in done.stderr and "lora_r: 16 in the checkpoint, 8 now" in done.stderr


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
