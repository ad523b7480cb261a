"""`vlm-quantize`: plan, calibrate (cached), and report; the same planning every `vlm-train` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from composing import compose_small

from vlm.cli.quantize import quantize
from vlm.errors import ConfigError


def compose_quantize(tmp_path: Path, *overrides: str, run: str = "run"):
    return compose_small("quantize", tmp_path, *overrides, run=run)


def test_dynamic_report_has_errors_decisions_memory_and_fidelity_and_calibrates_once(tmp_path, capsys):
    cfg = compose_quantize(tmp_path, "model=tiny_mllama", "calibration.budget_fraction=0.05")
    report = quantize(cfg)
    data = json.loads((tmp_path / "run" / "quant_report.json").read_text())

    assert data["policy"] == "dynamic" and data["budget_bytes"] == int(0.05 * data["memory"]["all_4bit_bytes"])
    assert 0 < data["memory"]["extra_over_all_4bit_bytes"] <= data["budget_bytes"]
    assert data["memory"]["all_4bit_bytes"] < data["memory"]["planned_bytes"] < data["memory"]["all_16bit_bytes"]
    layers = data["layers"]
    assert [layer["order"] for layer in layers] == list(range(len(layers)))  # along the model's depth
    calibrated = [layer["name"] for layer in layers if layer["decision"] == "calibrated"]
    assert calibrated and set(calibrated) | {"lm_head"} == set(data["kept_in_16bit"])
    assert {"policy", "all_4bit", "random_same_budget_0"} <= set(data["fidelity"])
    assert 0 <= data["fidelity"]["policy"]["top1_agreement"] <= 1 and data["fidelity"]["policy"]["kl"] > 0
    assert not data["calibration"]["cache_hit"]
    assert (tmp_path / "run" / "quant_report.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().err
    assert "layers most hurt by nf4" in printed and report.summary_lines()[1] in printed

    again = json.loads(json.dumps(quantize(compose_quantize(tmp_path, "model=tiny_mllama", "calibration.budget_fraction=0.05", run="again")).to_dict()))
    assert again["calibration"]["cache_hit"] and again["calibration"]["cache_key"] == data["calibration"]["cache_key"]
    assert again["kept_in_16bit"] == data["kept_in_16bit"] and again["layers"] == layers


def test_without_measuring_the_report_still_has_the_plan_and_memory(tmp_path):
    quantize(compose_quantize(tmp_path, "quant=bridge_skip", "calibration.measure=false"))
    data = json.loads((tmp_path / "run" / "quant_report.json").read_text())
    assert data["fidelity"] == {} and all(layer["output_error"] is None for layer in data["layers"])
    assert {layer["decision"] for layer in data["layers"]} == {"quantized", "always kept", "bridge_skip: vision", "bridge_skip: projector"}
    assert (tmp_path / "run" / "quant_report.png").read_bytes()[:4] == b"\x89PNG"  # the memory alone


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant=explicit"], "explicit needs quant.skip_modules"),
        (["quant=explicit", "quant.skip_modules=[vision_model]"], "'vision_model' matches no linear layer"),
        (["calibration.budget_bytes=lots"], "budget_bytes='lots' is not a size"),
        (["quant=none", "quant.policy=dynamic"], "dynamic chooses layers to quantize"),
    ],
)
def test_bad_quantization_settings_fail_with_the_key_named(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        quantize(compose_quantize(tmp_path, *overrides))


@pytest.mark.slow
def test_the_installed_command_writes_the_report_and_exits_2_on_bad_input(tmp_path):
    def vlm_quantize(name: str, *overrides: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
        env.update(VLM_CACHE_DIR=str(tmp_path / name / "cache"), OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "vlm.cli.quantize", f"hydra.run.dir={tmp_path / name / 'run'}",
                   "demo_data.n_train=16", "demo_data.n_val=8", "data.num_workers=0", *overrides]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    # The two commands side by side, on one thread each: on two cores they take the time of one.
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(vlm_quantize, "good")
        bad = pool.submit(vlm_quantize, "bad", "quant=explicit", "quant.skip_modules=[visual]")
        done, bad = good.result(), bad.result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "good" / "run" / "quant_report.json").is_file() and "kept in 16-bit" in done.stderr
    assert bad.returncode == 2 and "vlm-quantize: invalid config:" in bad.stderr


def test_a_16bit_model_too_large_for_the_gpu_skips_measuring_or_stops_dynamic_clearly(tmp_path, monkeypatch):
    import vlm.build.planning as planning

    monkeypatch.setattr(planning, "memory_shortfall", lambda size, device: "it needs about 24 GiB on cuda:0, which has 20 GiB free")
    report = quantize(compose_quantize(tmp_path, "quant=bridge_skip"))
    assert report.layers is None and report.fidelity == {}  # trained anyway, reported without measurements
    with pytest.raises(ConfigError, match="needs about 24 GiB.*calibration.device=cpu"):
        quantize(compose_quantize(tmp_path, "quant=dynamic"))
