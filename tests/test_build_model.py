"""The model's build steps: the frozen vision tower and projector run forward only, which changes
no loss and no LoRA gradient, and keeps the backward pass out of them; what a recipe leaves to the
device (``auto``) is decided for the device it is built on, and the reports say so."""

from __future__ import annotations

import pytest
import torch
from test_models import one_image_conversation

from vlm.build.model import BuildSteps, ModelRecipe, build_model
from vlm.build.planning import plan_checkpoint
from vlm.models.compiling import trainable_decoder_layers
from vlm.models.families import get_family
from vlm.models.loading import load_processor
from vlm.models.lora import LoraSettings
from vlm.patching import KernelSettings
from vlm.quant.calibrate import CalibrationSettings
from vlm.quant.config import QuantConfig

QUANT = QuantConfig(compute_dtype="float32")  # fp32: the two builds may differ by rounding order only


def built(model_type: str, path: str, lora: LoraSettings = LoraSettings(r=4, alpha=8), **steps):
    family = get_family(model_type)
    planning = plan_checkpoint(path, family, QUANT, CalibrationSettings(measure=False))
    torch.manual_seed(0)
    result = build_model(ModelRecipe(path, family, QUANT, lora), planning, BuildSteps(**steps))
    with torch.no_grad():  # fresh LoRA B is zero: nonzero, so that A's gradient says something
        for name, parameter in result.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return result


def loss_and_grads(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["llava", "mllama", "qwen2_vl"])
def test_a_frozen_vision_tower_runs_forward_only_and_changes_no_gradient(model_type, tiny_checkpoint, one_cpu_thread):
    path = tiny_checkpoint(model_type)
    family = get_family(model_type)
    batch = one_image_conversation(load_processor(path, family))

    reference = built(model_type, path, frozen_parts_forward_only=False)
    faster = built(model_type, path)
    assert "run forward only" in faster.summary()

    outputs, backward_calls = [], {"reference": [], "faster": []}
    for label, build in (("reference", reference), ("faster", faster)):
        tower = build.model.get_base_model().get_submodule(family.vision_tower)
        first_layer = next(m for m in tower.modules() if isinstance(m, torch.nn.Linear))
        first_layer.register_full_backward_hook(lambda *args, label=label: backward_calls[label].append(1))
    tower.register_forward_hook(lambda module, args, output: outputs.append(output))

    expected_loss, expected_grads = loss_and_grads(reference.model, batch)
    loss, grads = loss_and_grads(faster.model, batch)

    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    assert leaves and not any(t.requires_grad for t in leaves)
    assert backward_calls == {"reference": [1], "faster": []}  # the stock build runs the tower's backward


def test_a_frozen_mllama_tower_holds_only_the_layer_outputs_its_output_uses(tiny_checkpoint, one_cpu_thread):
    """Its encoders return every layer's output; without autograd the tower's forward would hold them all.
    (That its loss and gradients do not change is the test above.)"""
    path = tiny_checkpoint("mllama")
    family = get_family("mllama")
    result = built("mllama", path)
    tower = result.model.get_base_model().get_submodule(family.vision_tower)
    assert "keeping 1 of its" in result.summary()
    returned = {}
    for name in ("transformer", "global_transformer"):
        tower.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: returned.update({name: output.hidden_states}))
    result.model(**one_image_conversation(load_processor(path, family)))
    used = {index % len(tower.transformer.layers) for index in tower.intermediate_layers_indices}
    assert [index for index, state in enumerate(returned["transformer"]) if state is not None] == sorted(used)
    assert len(returned["transformer"]) == len(tower.transformer.layers)
    assert all(state is None for state in returned["global_transformer"])


def test_a_vision_tower_with_lora_weights_of_its_own_stays_in_the_backward(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_vl")
    lora = LoraSettings(r=4, target_modules=r"model\.visual\.blocks\.\d+\.attn\.qkv|.*q_proj")
    result = built("qwen2_vl", path, lora=lora)
    assert "left in the backward: model.visual" in result.summary()


@pytest.mark.parametrize("mode", ["none", "standard", "offload"])
def test_the_checkpointing_step_sets_what_the_recipe_asks(mode, tiny_checkpoint):
    family = get_family("qwen2_vl")
    path = tiny_checkpoint("qwen2_vl")
    planning = plan_checkpoint(path, family, QUANT, CalibrationSettings(measure=False))
    result = build_model(ModelRecipe(path, family, QUANT, LoraSettings(r=4, alpha=8), checkpointing=mode), planning)
    layers = [m for m in result.model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert bool(layers) == (mode != "none")
    assert (result.offloader is not None) == (mode == "offload")
    reports = {report.step: report.summary for report in result.reports}
    assert ("checkpointing" in reports) == (mode != "none")
    if mode == "offload":
        assert "pinned host memory" in reports["checkpointing"]
        assert all(layer._gradient_checkpointing_func == result.offloader.checkpoint for layer in layers)


def test_on_the_cpu_auto_compiles_nothing_and_patches_no_auto_kernel_and_the_reports_say_so(tiny_checkpoint):
    """The default recipe (kernels=auto, model.compile=auto) on the CPU; a kernel patched inside the layers
    (lora) would refuse compile=layers, never auto."""
    family = get_family("qwen2_vl")
    path = tiny_checkpoint("qwen2_vl")
    planning = plan_checkpoint(path, family, QUANT, CalibrationSettings(measure=False))
    kernels = KernelSettings(cross_entropy="auto", lora=True)
    result = build_model(ModelRecipe(path, family, QUANT, LoraSettings(r=4, alpha=8), kernels, compile="auto"), planning)
    reports = {report.step: report.summary for report in result.reports}
    assert reports["compile"] == "auto → none (not CUDA)" and result.compile == "none"
    assert reports["kernels"].endswith("; cross_entropy: auto → off (not CUDA)")
    assert result.kernels == KernelSettings(cross_entropy=False, lora=True)
    assert "cross_entropy" not in result.patches.patched and result.patches.patched["lora"] > 0
    assert not any("forward" in vars(layer) for layer in trainable_decoder_layers(result.model))  # none compiled
    with pytest.raises(ValueError, match="model.compile=layers does not take the kernels patched inside the layers: lora"):
        build_model(ModelRecipe(path, family, QUANT, LoraSettings(r=4, alpha=8), kernels, compile="layers"), planning)
