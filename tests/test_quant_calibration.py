"""Calibration on any tree of linear layers: per-layer errors, the budgeted choice, the cache."""

from __future__ import annotations

import json

import pytest
import torch
from planted import ToyLM, every_position, toy_batches, toy_forward

from vlm.quant.calibrate import (
    CalibrationSettings,
    batches_fingerprint,
    measure,
    parse_bytes,
)
from vlm.quant.fidelity import fidelity, reference_log_probs
from vlm.quant.selection import Candidate, candidates, greedy_keep, random_keep
from vlm.quant.sensitivity import measure_layers
from vlm.quant.simulate import simulated_quantization

TOY_LINEARS = [f"blocks.{b}.{p}" for b in range(3) for p in ("up", "down")]


@pytest.fixture
def planted_toy():
    model = ToyLM()
    planted = model.plant(block=1)
    return model.eval(), planted


def test_the_planted_layer_stands_out_in_output_error_and_the_rest_look_like_plain_nf4(planted_toy):
    model, planted = planted_toy
    layers = {layer.name: layer for layer in measure_layers(model, TOY_LINEARS, toy_batches(3), toy_forward, "nf4")}
    assert layers[planted].output_error > 0.8
    others = [layer for name, layer in layers.items() if name != planted]
    assert all(0.05 < layer.output_error < 0.2 and 0.05 < layer.weight_error < 0.15 for layer in others)
    # Outliers hurt the weight too, but far less than the output: the activations make the difference.
    assert layers[planted].output_error > 3 * layers[planted].weight_error


def test_layers_come_in_execution_order_and_unreached_ones_are_marked(planted_toy):
    model, _ = planted_toy
    model.extra = torch.nn.Linear(4, 4)  # never called by forward
    layers = measure_layers(model, ["blocks.2.down", "extra", "blocks.0.up"], toy_batches(1), toy_forward, "nf4")
    assert [(layer.name, layer.order) for layer in layers] == [("blocks.0.up", 0), ("blocks.2.down", 1), ("extra", None)]
    assert layers[-1].output_error is None and layers[-1].weight_error > 0


def test_end_to_end_kl_ranks_the_planted_layer_first(planted_toy):
    model, planted = planted_toy
    settings = CalibrationSettings(end_to_end=True, end_to_end_layers=None, cache=False)
    result = measure(model, TOY_LINEARS, toy_batches(2), toy_forward, every_position, method="nf4", double_quant=True, settings=settings)
    by_kl = sorted(result.layers, key=lambda layer: -layer.kl)
    assert by_kl[0].name == planted and by_kl[0].kl > 20 * by_kl[1].kl > 0


def test_greedy_keeps_most_noise_per_byte_within_budget_and_breaks_ties_by_name():
    pool = [
        Candidate("small_noisy", 100, 0.5),
        Candidate("big_noisy", 1000, 2.0),
        Candidate("tie_b", 100, 0.1),
        Candidate("tie_a", 100, 0.1),
        Candidate("unreached", 10, None),
    ]
    assert greedy_keep(pool, 300) == ["small_noisy", "tie_a", "tie_b"]
    assert greedy_keep(pool, 250) == ["small_noisy", "tie_a"]
    assert greedy_keep(pool, 1100) == ["small_noisy", "big_noisy"]  # 1100 spent: no room for ties
    assert greedy_keep(pool, 99) == []
    chosen = random_keep(pool, 250, seed=3)
    assert sum(c.extra_bytes for c in pool if c.name in chosen) <= 250
    assert chosen == random_keep(pool, 250, seed=3)


def test_noise_is_error_power_or_kl():
    from vlm.quant.sensitivity import LayerError

    layer = LayerError("a", (64, 64), 0, weight_error=0.1, output_error=0.3, kl=0.02)
    assert candidates([layer], "output", "nf4")[0].noise == pytest.approx(0.09)
    assert candidates([layer], "weight", "nf4")[0].noise == pytest.approx(0.01)
    assert candidates([layer], "kl", "nf4")[0].noise == 0.02
    assert candidates([layer], "output", "nf4")[0].extra_bytes == 64 * 64 * 2 - (2048 + 64 + 4 + 64 + 1028)


def test_measurements_are_cached_by_model_and_data_and_are_deterministic(planted_toy, tmp_path):
    model, _ = planted_toy
    settings = CalibrationSettings()
    run = lambda batches: measure(  # noqa: E731
        model, TOY_LINEARS, batches, toy_forward, every_position,
        method="nf4", double_quant=True, settings=settings, cache_dir=tmp_path,
    )
    first, again = run(toy_batches(2)), run(toy_batches(2))
    assert not first.cache_hit and again.cache_hit and first.cache_key == again.cache_key
    assert [layer.as_dict() for layer in first.layers] == [layer.as_dict() for layer in again.layers]
    fresh = measure(model, TOY_LINEARS, toy_batches(2), toy_forward, every_position, method="nf4", double_quant=True, settings=CalibrationSettings(cache=False))
    assert [layer.as_dict() for layer in fresh.layers] == [layer.as_dict() for layer in first.layers]
    assert json.loads((tmp_path / f"{first.cache_key}.json").read_text())["key"] == first.cache_key

    other_data = run(toy_batches(2, seed=7))
    assert not other_data.cache_hit and other_data.cache_key != first.cache_key
    with torch.no_grad():
        model.blocks[0]["up"].weight.mul_(1.5)
    assert run(toy_batches(2)).cache_key != first.cache_key  # another model, another entry
    assert batches_fingerprint(toy_batches(2)) == batches_fingerprint(toy_batches(2))


def test_simulated_quantization_leaves_the_model_as_it_was(planted_toy):
    model, planted = planted_toy
    before = {n: p.clone() for n, p in model.state_dict().items()}
    batches = toy_batches(1)
    reference = reference_log_probs(model, batches, toy_forward, every_position)
    with simulated_quantization(model, [planted], "nf4"):
        assert fidelity(model, batches, toy_forward, every_position, reference).kl > 0.01

    def fail(*args):
        raise RuntimeError("a forward that fails inside the quantized layer")

    failing = model.get_submodule(planted).register_forward_hook(fail)  # runs before the swap-back hook
    with pytest.raises(RuntimeError), simulated_quantization(model, [planted], "nf4"):
        toy_forward(model, batches[0])
    failing.remove()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert fidelity(model, batches, toy_forward, every_position, reference).kl == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(123456, 123456), ("700MB", 700_000_000), ("0.5GiB", 2**29), ("64 KiB", 65536), ("1000", 1000)],
)
def test_budgets_read_as_bytes(value, expected):
    assert parse_bytes(value) == expected
    assert CalibrationSettings(budget_bytes=value).budget(all_4bit_bytes=10**9) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"budget_bytes": "lots"}, "budget_bytes='lots' is not a size"),
        ({"budget_bytes": "7 parsecs"}, "not a size"),
        ({"budget_fraction": -0.1}, "budget_fraction=-0.1"),
        ({"batches": 0}, "calibration.batches=0"),
        ({"score": "kl"}, "score=kl needs calibration.end_to_end=true"),
        ({"score": "vibes"}, "calibration.score='vibes'"),
    ],
)
def test_settings_refuse_what_they_cannot_use(settings, message):
    with pytest.raises(ValueError, match=message):
        CalibrationSettings(**settings)


def test_the_default_budget_is_ten_percent_of_all_4bit_memory():
    assert CalibrationSettings().budget(all_4bit_bytes=6_540_000_000) == 654_000_000
