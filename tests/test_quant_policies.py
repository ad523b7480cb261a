"""Skip-layer policies resolve to exact module names, and the loaded model quantizes exactly those."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest

from vlm.models.families import get_family
from vlm.models.loading import load_model
from vlm.quant.bnb_layers import quantized_layer_names
from vlm.quant.config import QuantConfig
from vlm.quant.policies import ModelParts, PolicyError, linear_layer_names, plan

CLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
MLLAMA_VIT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.fc1", "mlp.fc2")


def layers(prefix: str, count: int, linears: tuple[str, ...]) -> set[str]:
    return {f"{prefix}.{i}.{linear}" for i in range(count) for linear in linears}


# What each tiny family keeps in 16-bit under vision_skip, written out by name: the vision tower's
# linear layers and the projector (lm_head is always kept).
VISION_SKIP_KEEPS = {
    "llava": layers("model.vision_tower.encoder.layers", 2, CLIP_LINEARS)
    | {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head"},
    "llava_next": layers("model.vision_tower.encoder.layers", 2, CLIP_LINEARS)
    | {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head"},
    "mllama": layers("model.vision_model.transformer.layers", 2, MLLAMA_VIT_LINEARS)
    | layers("model.vision_model.global_transformer.layers", 1, MLLAMA_VIT_LINEARS)
    | {"model.multi_modal_projector", "lm_head"},
    "qwen2_vl": layers("model.visual.blocks", 2, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    | {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"},
    "qwen2_5_vl": layers("model.visual.blocks", 2, ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    | {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"},
    # The DeepStack mergers bridge vision and language as the final merger does.
    "qwen3_vl": layers("model.visual.blocks", 2, ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"))
    | {"model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"}
    | {"model.visual.deepstack_merger_list.0.linear_fc1", "model.visual.deepstack_merger_list.0.linear_fc2", "lm_head"},
    # Gemma 3's projector is pooling, a norm and a bare weight matrix: no linear layer to keep.
    "gemma3": layers("model.vision_tower.encoder.layers", 2, CLIP_LINEARS) | {"lm_head"},
    "smolvlm": layers("model.vision_model.encoder.layers", 2, CLIP_LINEARS)
    | {"model.connector.modality_projection.proj", "lm_head"},
    "idefics3": layers("model.vision_model.encoder.layers", 2, CLIP_LINEARS)
    | {"model.connector.modality_projection.proj", "lm_head"},
}
# bridge_skip adds the cross-attention output projections: only Mllama has cross-attention.
BRIDGE_SKIP_KEEPS = {
    **VISION_SKIP_KEEPS,
    "mllama": VISION_SKIP_KEEPS["mllama"] | {"model.language_model.layers.1.cross_attn.o_proj"},
}


@pytest.mark.parametrize("model_type", sorted(VISION_SKIP_KEEPS))
@pytest.mark.parametrize("policy", ["vision_skip", "bridge_skip"])
def test_skip_policies_quantize_exactly_the_expected_layers(model_type, policy, tiny_checkpoint):
    expected_kept = (VISION_SKIP_KEEPS if policy == "vision_skip" else BRIDGE_SKIP_KEEPS)[model_type]
    model, report = load_model(tiny_checkpoint(model_type), get_family(model_type), QuantConfig(policy=policy))
    every_linear = set(linear_layer_names(model))

    assert set(report.plan.kept) == expected_kept
    assert set(quantized_layer_names(model)) == every_linear - expected_kept
    assert all(type(model.get_submodule(name)) is bnb.nn.Linear4bit for name in every_linear - expected_kept)


def test_methods_store_the_planned_layers_in_their_format(tiny_checkpoint):
    path, family = tiny_checkpoint("qwen2_vl"), get_family("qwen2_vl")
    fp4, report = load_model(path, family, QuantConfig(method="fp4"))
    assert {fp4.get_submodule(n).weight.quant_state.quant_type for n in report.plan.quantized} == {"fp4"}
    int8, report = load_model(path, family, QuantConfig(method="int8"))
    assert all(type(int8.get_submodule(n)) is bnb.nn.Linear8bitLt for n in report.plan.quantized)
    none, report = load_model(path, family, QuantConfig(method="none"))
    assert quantized_layer_names(none) == [] and report.plan.quantized == ()


def test_explicit_policy_keeps_exactly_the_layers_its_regexes_name(tiny_checkpoint):
    path, family = tiny_checkpoint("mllama"), get_family("mllama")
    keep = [r"model\.language_model\.layers\.\d+\.cross_attn\.(q|o)_proj", r"model\.multi_modal_projector"]
    model, report = load_model(path, family, QuantConfig(policy="explicit", skip_modules=keep))
    assert set(report.plan.kept) == {
        "model.language_model.layers.1.cross_attn.q_proj",
        "model.language_model.layers.1.cross_attn.o_proj",
        "model.multi_modal_projector",
        "lm_head",
    }
    assert set(quantized_layer_names(model)) == set(linear_layer_names(model)) - set(report.plan.kept)


NAMES = ["vision.blocks.0.fc", "vision.merger.fc", "text.layers.0.q", "text.layers.0.cross_o", "lm_head"]
PARTS = ModelParts(vision=("vision",), projector=("vision.merger",), cross_attention_out=r"text\.layers\.\d+\.cross_o")


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        ("standard", {"lm_head"}),
        ("vision_skip", {"vision.blocks.0.fc", "vision.merger.fc", "lm_head"}),
        ("bridge_skip", {"vision.blocks.0.fc", "vision.merger.fc", "text.layers.0.cross_o", "lm_head"}),
    ],
)
def test_part_policies_work_on_names_alone(policy, kept):
    resolved = plan(NAMES, policy, PARTS)
    assert set(resolved.kept) == kept
    assert set(resolved.quantized) == set(NAMES) - kept
    assert PARTS.part_of("vision.merger.fc") == "projector"  # nested inside the vision prefix


def test_a_short_name_that_matches_no_full_name_is_refused():
    with pytest.raises(PolicyError, match="'vision' matches no linear layer.*full module names"):
        plan(NAMES, "explicit", PARTS, skip_modules=["vision"])
    with pytest.raises(PolicyError, match="not a valid regex"):
        plan(NAMES, "explicit", PARTS, skip_modules=["vision(["])


def test_dynamic_keeps_what_calibration_chose_and_nothing_it_does_not_know():
    assert set(plan(NAMES, "dynamic", PARTS, calibrated=["text.layers.0.q"]).kept) == {"text.layers.0.q", "lm_head"}
    with pytest.raises(PolicyError, match="not linear layers"):
        plan(NAMES, "dynamic", PARTS, calibrated=["text.layers.9.q"])


def test_config_refuses_policies_that_cannot_be_resolved():
    with pytest.raises(ValueError, match="quant.policy='vision'"):
        QuantConfig(policy="vision")
    with pytest.raises(ValueError, match="explicit needs quant.skip_modules"):
        QuantConfig(policy="explicit")
    with pytest.raises(ValueError, match="dynamic needs the calibrated plan"):
        load_model("unused", get_family("llava"), QuantConfig(policy="dynamic"))
