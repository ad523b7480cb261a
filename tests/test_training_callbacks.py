"""ThroughputMonitor and RunSummary on a tiny real QLoRA model trained with Lightning."""

from __future__ import annotations

import csv
import functools
import json
import math
import time
from pathlib import Path

import lightning
import pytest
import torch
from peft import PeftModel
from tiny_llama import N_LINEAR_4BIT, cpu_trainer, load_4bit, loader, make_batch

from vlm.training.callbacks import RunSummary, ThroughputMonitor, count_parameters
from vlm.training.module import VisionLanguageFineTuner
from vlm.training.optim import LRScheduleConfig, adamw
from vlm.training.plain import plain

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def load_base(tiny_llama_dir: Path):
    return lambda: load_4bit(tiny_llama_dir)


def make_module(model: torch.nn.Module, steps: int = 6) -> VisionLanguageFineTuner:
    return VisionLanguageFineTuner(
        model,
        optimizer=functools.partial(adamw, lr=1e-2),
        scheduler=LRScheduleConfig(warmup_steps=1, total_steps=steps),
    )


def make_trainer(tmp_path: Path, callbacks, **kwargs) -> lightning.Trainer:
    return cpu_trainer(tmp_path, callbacks=callbacks, **kwargs)


def _reject_constant(name: str):
    raise ValueError(f"non-strict JSON constant {name}")


def read_metrics(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=_reject_constant)


# --------------------------------------------------------------------------- tests
def test_run_summary_after_validate_and_fit(make_qlora_model, load_base, tmp_path: Path) -> None:
    out = tmp_path / "run"
    monitor = ThroughputMonitor()
    summary = RunSummary(out, facts={"run_name": "tiny", "nan_metric": float("nan"), "path": tmp_path})
    trainer = make_trainer(tmp_path, [monitor, summary], max_steps=6, val_check_interval=3, num_sanity_val_steps=1)
    module = make_module(make_qlora_model())
    train = loader([make_batch(0), make_batch(1), make_batch(2)] * 2)
    val = loader([make_batch(0), make_batch(1, pad=0)])

    initial = trainer.validate(module, dataloaders=val, verbose=False)[0]["val/loss"]
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)

    metrics = read_metrics(out / "metrics.json")
    assert metrics["status"] == "completed"
    for key in (
        "first_train_loss", "last_train_loss", "initial_val_loss", "final_val_loss", "val_loss_reduction",
        "tokens_per_s", "samples_per_s", "peak_memory_bytes", "wall_time_s", "train_time_s", "steps",
        "trainable_params", "total_params", "quantized_linear_layers",
    ):  # fmt: skip
        assert metrics[key] is not None, key
    # initial = the pre-fit validate(), not the sanity check; two more validations during fit.
    history = metrics["val_loss_history"]
    assert [h["stage"] for h in history] == ["validate", "fit", "fit"]
    assert metrics["initial_val_loss"] == pytest.approx(initial)
    assert metrics["final_val_loss"] == pytest.approx(history[-1]["value"])
    assert metrics["final_val_loss"] < metrics["initial_val_loss"]  # the val batches are in the train set
    assert metrics["val_loss_reduction"] == pytest.approx(1 - metrics["final_val_loss"] / metrics["initial_val_loss"])
    assert metrics["last_train_loss"] < metrics["first_train_loss"]
    assert metrics["steps"] == 6
    assert metrics["quantized_linear_layers"] == N_LINEAR_4BIT
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert metrics["trainable_params"] == trainable
    assert metrics["total_params"] > 50_000 > trainable  # 4-bit weights counted unpacked
    assert (metrics["trainable_params"], metrics["total_params"]) == count_parameters(module.model)
    assert metrics["tokens_per_s"] > 0 and metrics["samples_per_s"] > 0
    assert metrics["total_tokens"] == 6 * (16 + 13)
    assert metrics["total_samples"] == 12
    assert 0 < metrics["train_time_s"] <= metrics["wall_time_s"]
    assert metrics["peak_memory_bytes"] > 10 * 2**20  # peak RSS of this process
    assert metrics["run_name"] == "tiny" and metrics["nan_metric"] is None and metrics["path"] == str(tmp_path)

    # The adapter: safetensors + config, loadable onto a fresh 4-bit base.
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file()
    assert metrics["adapter_dir"] == str(adapter)
    reloaded = PeftModel.from_pretrained(load_base(), adapter)
    trained = {n: p for n, p in module.model.named_parameters() if "lora_" in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(param.detach().float(), trained[name].detach().float()), name

    # A validation after fit (same Trainer) updates final_val_loss in metrics.json.
    after = trainer.validate(module, dataloaders=val, verbose=False)[0]["val/loss"]
    updated = read_metrics(out / "metrics.json")
    assert len(updated["val_loss_history"]) == 4
    assert updated["final_val_loss"] == pytest.approx(after)
    assert updated["initial_val_loss"] == pytest.approx(initial)


class _SlowValidation(VisionLanguageFineTuner):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        time.sleep(0.25)
        return super().validation_step(batch, batch_idx, dataloader_idx)


def test_throughput_monitor_logs_each_step_and_excludes_validation(make_qlora_model, tmp_path: Path) -> None:
    monitor = ThroughputMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, val_check_interval=2, num_sanity_val_steps=0)
    module = _SlowValidation(make_qlora_model(), optimizer=functools.partial(adamw, lr=1e-3))
    batches = [make_batch(0), make_batch(1, pad=0), make_batch(2, pad=5), make_batch(3, batch=1)]
    start = time.perf_counter()
    trainer.fit(module, loader(batches), loader([make_batch(9)]))
    fit_time = time.perf_counter() - start

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    assert len(rows) == 4  # one row per training step (log_every_n_steps=1)
    for r in rows:
        for key in ("perf/tokens_per_s", "perf/samples_per_s", "perf/step_time_s", "perf/peak_memory_bytes"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, key
    # Logged at the same steps as Lightning's own train/loss rows.
    loss_steps = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        loss_steps = {r["step"] for r in csv.DictReader(f) if r.get("train/loss")}
    assert {r["step"] for r in rows} == loss_steps

    tokens = [int(b["attention_mask"].sum()) for b in batches]
    assert monitor.total_tokens == sum(tokens)
    assert float(rows[-1]["perf/tokens_total"]) == sum(tokens)
    assert monitor.total_samples == 2 + 2 + 2 + 1
    assert monitor.total_steps == 4
    # Two validation runs of 0.25 s each are not training time.
    assert monitor.train_time_s < fit_time - 0.45
    summary = monitor.summary()
    assert summary["tokens_per_s"] == pytest.approx(sum(tokens) / monitor.train_time_s)


class _Boom(VisionLanguageFineTuner):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("boom at step 2")
        return super().training_step(batch, batch_idx)


def test_run_summary_records_failures(make_qlora_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(tmp_path, [ThroughputMonitor(), RunSummary(out, facts={"seed": 3})], max_steps=5)
    module = _Boom(make_qlora_model(), optimizer=functools.partial(adamw, lr=1e-3))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, loader([make_batch(i) for i in range(5)]))
    metrics = read_metrics(out / "metrics.json")
    assert metrics["status"] == "failed"
    assert "RuntimeError" in metrics["error"] and "boom at step 2" in metrics["error"]
    assert metrics["steps"] == 2 and metrics["first_train_loss"] is not None
    assert metrics["initial_val_loss"] is None and metrics["val_loss_reduction"] is None
    assert metrics["seed"] == 3
    assert not (out / "adapter").exists()


def test_run_summary_state_survives_checkpoint_round_trip(tmp_path: Path) -> None:
    first = RunSummary(tmp_path)
    first._first_loss = torch.tensor(2.5)
    first._val_history = [{"value": 3.0, "step": 0, "stage": "validate"}]
    state = first.state_dict()
    json.dumps(state, allow_nan=False)  # plain data (checkpoint loads with weights_only=True)
    second = RunSummary(tmp_path)
    second.load_state_dict(state)
    assert second.state_dict() == state


def test_plain_data_is_strict_json() -> None:
    value = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "tensor": torch.tensor(1.5),
        "int_tensor": torch.tensor(7),
        "path": Path("/x"),
        "nested": [1, (2.0, float("nan"))],
        1: "key",
    }
    text = json.dumps(plain(value), allow_nan=False)
    assert json.loads(text) == {
        "nan": None,
        "inf": None,
        "tensor": 1.5,
        "int_tensor": 7,
        "path": "/x",
        "nested": [1, [2.0, None]],
        "1": "key",
    }


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the resident-set peak needs Linux")
def test_peak_memory_is_counted_per_job_not_over_the_whole_process() -> None:
    from vlm.training.callbacks import peak_memory_bytes, reset_peak_memory

    big = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    with_big = peak_memory_bytes()
    del big
    reset_peak_memory()
    assert peak_memory_bytes() < with_big - 32 * 2**20


def test_metrics_json_is_readable_by_others_under_the_users_umask(make_qlora_model, tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        trainer = make_trainer(tmp_path, [RunSummary(out)], max_steps=1)
        trainer.fit(make_module(make_qlora_model()), train_dataloaders=loader([make_batch(0)]))
    finally:
        os.umask(old)
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o644
