"""The public planning API works on any module tree: on a plain text transformer, built here, the
calibrated ``dynamic`` choice keeps the one layer whose quantization hurts, and buys fidelity."""

from __future__ import annotations

import pytest
import torch
from planted import plant_outliers
from transformers import LlamaConfig, LlamaForCausalLM

from vlm.build.planning import causal_lm_probe, plan_model
from vlm.errors import ConfigError
from vlm.quant.calibrate import CalibrationSettings
from vlm.quant.config import QuantConfig
from vlm.quant.formats import weight_bytes

PLANTED = "model.layers.1.mlp.down_proj"
FEEDER = "model.layers.1.mlp.up_proj"
VOCAB = 256


@pytest.fixture(scope="module")
def text_transformer():
    """A two-layer Llama (no vision anywhere) with outlier weights planted in one MLP projection."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.1,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        plant_outliers(model.get_submodule(PLANTED), model.get_submodule(FEEDER), channel=5)
    return model


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        input_ids = torch.randint(0, VOCAB, (2, 32), generator=generator)
        out.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids})
    return out


def test_dynamic_keeps_the_planted_layer_of_a_text_transformer_and_beats_the_alternatives(text_transformer, one_cpu_thread):
    planted_extra = weight_bytes((128, 256), "none") - weight_bytes((128, 256), "nf4")
    settings = CalibrationSettings(budget_bytes=planted_extra + 1000, random_baselines=4, cache=False)
    planning = plan_model(
        text_transformer,
        QuantConfig(policy="dynamic"),
        settings,
        batches=batches(4, seed=0),
        heldout=batches(2, seed=1),
        probe=causal_lm_probe("cpu"),
        label="tiny llama",
    )

    assert planning.plan.kept == (PLANTED, "lm_head")
    assert len(planning.plan.quantized) == 13  # 7 projections per layer, the planted one kept
    report = planning.report
    assert report.model == "tiny llama" and report.budget_bytes == planted_extra + 1000
    assert max(report.layers, key=lambda layer: layer.output_error).name == PLANTED
    assert report.memory.extra_over_all_4bit == planted_extra
    kl = {label: score.kl for label, score in report.fidelity.items()}
    randoms = [value for label, value in kl.items() if label.startswith("random_same_budget")]
    assert len(randoms) == 4
    assert kl["policy"] < 0.7 * kl["all_4bit"]
    assert kl["policy"] < min(randoms)
    assert planning.reference is not None and len(planning.heldout) == 2


def test_a_skip_pattern_that_matches_no_layer_of_the_model_is_refused(text_transformer):
    quant = QuantConfig(policy="explicit", skip_modules=("vision_tower.*",))
    with pytest.raises(ConfigError, match="matches no linear layer"):
        plan_model(text_transformer, quant, CalibrationSettings(cache=False), batches=batches(1, 0), probe=causal_lm_probe("cpu"))
