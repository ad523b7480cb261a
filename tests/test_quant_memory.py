"""Weight memory: predicted from a weightless skeleton, it matches the loaded model to the byte."""

from __future__ import annotations

import bitsandbytes.functional as bnb_f
import pytest
import torch

from vlm.models.families import get_family
from vlm.models.loading import load_config, load_model, model_skeleton
from vlm.quant.config import QuantConfig
from vlm.quant.formats import round_trip, weight_bytes
from vlm.quant.memory import human_bytes, predicted_bytes, stored_bytes, weight_memory
from vlm.quant.policies import linear_layer_names, plan


@pytest.mark.parametrize("shape", [(64, 64), (3, 100), (1, 7), (129, 257)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_size_counts_every_tensor_bitsandbytes_keeps(shape, double_quant):
    packed, state = bnb_f.quantize_4bit(torch.randn(shape), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax, state.code, state.offset]
    if double_quant:
        tensors += [state.state2.absmax, state.state2.code]
    counted = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    assert weight_bytes(shape, "nf4", double_quant) == counted


@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig(),
        QuantConfig(double_quant=False),
        QuantConfig(method="fp4"),
        QuantConfig(method="int8"),
        QuantConfig(method="none"),
        QuantConfig(policy="bridge_skip"),
    ],
    ids=["nf4", "nf4-single-quant", "fp4", "int8", "none", "bridge_skip"],
)
def test_prediction_from_the_skeleton_equals_the_loaded_models_bytes(quant, tiny_checkpoint):
    path, family = tiny_checkpoint("mllama"), get_family("mllama")
    skeleton = model_skeleton(family, load_config(path, family))
    quant_plan = quant.resolve(linear_layer_names(skeleton), family.parts)
    predicted = predicted_bytes(skeleton, quant_plan.quantized, quant.method, quant.double_quant)
    model, _ = load_model(path, family, quant)
    assert stored_bytes(model) == predicted


def test_policies_order_by_memory_and_skipping_costs_what_the_kept_layers_cost(tiny_checkpoint):
    path, family = tiny_checkpoint("qwen2_vl"), get_family("qwen2_vl")
    skeleton = model_skeleton(family, load_config(path, family))
    names = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    all_4bit = plan(names, "standard", family.parts)
    bridge = plan(names, "bridge_skip", family.parts)
    memory = weight_memory(skeleton, bridge.quantized, all_4bit.quantized, "nf4")
    assert memory.all_4bit < memory.planned < memory.all_16bit
    shapes = {n: tuple(skeleton.get_submodule(n).weight.shape) for n in names}
    kept_extra = sum(weight_bytes(shapes[n], "none") - weight_bytes(shapes[n], "nf4") for n in set(bridge.kept) - {"lm_head"})
    assert memory.extra_over_all_4bit == kept_extra


def test_round_trip_is_what_a_four_bit_layer_multiplies_with():
    weight = torch.randn(48, 200, dtype=torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(round_trip(weight, "nf4"), bnb_f.dequantize_4bit(packed, state))
    error = (round_trip(weight, "nf4").float() - weight.float()).norm() / weight.float().norm()
    assert 0.05 < error < 0.15  # NF4 on Gaussian weights: about 10%
    int8_error = (round_trip(weight, "int8").float() - weight.float()).norm() / weight.float().norm()
    assert int8_error < error / 4


def test_sizes_read_in_binary_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024**2 // 2) == "1.5 MiB"
    assert human_bytes(-1.5 * 1024**3) == "-1.50 GiB"
