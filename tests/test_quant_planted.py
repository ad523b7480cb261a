"""A planted sensitive layer: dynamic calibration finds it, keeps it in 16-bit, and its fidelity
beats both the standard all-4-bit recipe and random choices of layers under the same budget."""

from __future__ import annotations

import statistics

import pytest
import torch
from planted import (
    QWEN_PLANTED,
    ToyLM,
    every_position,
    planted_checkpoint,
    toy_batches,
    toy_forward,
)

from vlm.build.planning import causal_lm_probe, check_loaded, plan_checkpoint, take_batches
from vlm.data.datamodule import ShardDataModule
from vlm.data.demo import write_demo_shards
from vlm.models.families import get_family
from vlm.models.loading import load_model, load_processor
from vlm.quant.calibrate import CalibrationSettings
from vlm.quant.config import QuantConfig
from vlm.quant.fidelity import fidelity, reference_log_probs
from vlm.quant.selection import candidates, greedy_keep, random_keep
from vlm.quant.sensitivity import measure_layers
from vlm.quant.simulate import simulated_quantization


def test_on_any_linear_tree_the_calibrated_choice_keeps_the_planted_layer_and_beats_random():
    model = ToyLM().eval()
    planted = model.plant(block=1)
    names = [f"blocks.{b}.{p}" for b in range(3) for p in ("up", "down")]
    pool = candidates(measure_layers(model, names, toy_batches(4), toy_forward, "nf4"), "output", "nf4")
    budget = pool[0].extra_bytes  # room for one layer of six
    kept = greedy_keep(pool, budget)
    assert kept == [planted]

    heldout = toy_batches(2, seed=1)
    reference = reference_log_probs(model, heldout, toy_forward, every_position)

    def kl_keeping(keep):
        with simulated_quantization(model, [n for n in names if n not in keep], "nf4"):
            return fidelity(model, heldout, toy_forward, every_position, reference).kl

    calibrated, all_4bit = kl_keeping(kept), kl_keeping([])
    random_kls = [kl_keeping(random_keep(pool, budget, seed)) for seed in range(8)]
    assert calibrated < 0.1 * all_4bit
    assert calibrated <= min(random_kls)
    assert calibrated < 0.5 * statistics.mean(random_kls)


@pytest.fixture(scope="module")
def planted_qwen(tiny_checkpoint, tmp_path_factory):
    """Tiny Qwen2-VL with a planted layer, its processor, calibration and held-out batches."""
    family = get_family("qwen2_vl")
    root = tmp_path_factory.mktemp("planted")
    checkpoint = str(planted_checkpoint(tiny_checkpoint("qwen2_vl"), root / "model", family))
    write_demo_shards(root / "data", 48, 16, 64, 0)
    processor = load_processor(checkpoint, family)
    data = ShardDataModule(
        str(root / "data" / "train-*.tar"),
        processor,
        family.image_token,
        processor.tokenizer.pad_token_id,
        val_urls=str(root / "data" / "val-*.tar"),
        batch_major_keys=family.batch_major_image_keys,
        batch_size=4,
        max_seq_length=256,
        num_workers=0,
    )
    calibration = take_batches(data.stream_dataloader(data.urls), 4)
    heldout = take_batches(data.stream_dataloader(data.val_urls), 4)
    return family, checkpoint, calibration, heldout


def test_dynamic_keeps_the_planted_layer_of_a_vision_language_model_and_buys_fidelity(planted_qwen, one_cpu_thread):
    family, checkpoint, calibration, heldout = planted_qwen
    settings = CalibrationSettings(budget_bytes="64KB", random_baselines=6, cache=False)
    planning = plan_checkpoint(
        checkpoint, family, QuantConfig(policy="dynamic"), settings, calibration_batches=calibration, heldout_batches=heldout
    )
    report = planning.report

    assert QWEN_PLANTED in planning.plan.kept
    worst = max(report.layers, key=lambda layer: layer.output_error or 0)
    assert worst.name == QWEN_PLANTED
    assert report.memory.extra_over_all_4bit <= 64_000
    fidelity_of = report.fidelity
    random_kls = [f.kl for label, f in fidelity_of.items() if label.startswith("random_same_budget")]
    assert len(random_kls) == 6
    assert fidelity_of["policy"].kl < 0.8 * fidelity_of["all_4bit"].kl
    assert fidelity_of["policy"].kl < min(random_kls)
    assert fidelity_of["policy"].kl < 0.85 * statistics.mean(random_kls)
    assert fidelity_of["policy"].top1_agreement >= fidelity_of["all_4bit"].top1_agreement

    # The real bitsandbytes model under the same plan behaves as the simulation said.
    model, _ = load_model(checkpoint, family, QuantConfig(policy="dynamic"), quant_plan=planning.plan)
    loaded = check_loaded(planning, model, "cpu")
    assert loaded.tokens == fidelity_of["policy"].tokens
    assert loaded.kl == pytest.approx(fidelity_of["policy"].kl, rel=1e-6)


def test_a_tight_budget_still_reaches_the_planted_layer_first(planted_qwen, one_cpu_thread):
    family, checkpoint, calibration, _ = planted_qwen
    settings = CalibrationSettings(budget_bytes=48_000, fidelity_batches=0, cache=False)
    planning = plan_checkpoint(checkpoint, family, QuantConfig(policy="dynamic"), settings, calibration_batches=calibration)
    assert QWEN_PLANTED in planning.plan.kept
    assert planning.report.fidelity == {} and planning.reference is None


def test_simulated_quantization_matches_the_loaded_four_bit_model(planted_qwen, one_cpu_thread):
    family, checkpoint, _, heldout = planted_qwen
    probe = causal_lm_probe("cpu")
    sixteen, _ = load_model(checkpoint, family, QuantConfig(method="none"))
    four, report = load_model(checkpoint, family, QuantConfig())
    with torch.no_grad(), simulated_quantization(sixteen.eval(), report.plan.quantized, "nf4"):
        simulated = probe.forward(sixteen, heldout[0])
    with torch.no_grad():
        real = probe.forward(four.eval(), heldout[0])
    # On the CPU bitsandbytes dequantizes and multiplies exactly as the simulation does.
    assert torch.equal(simulated, real)
