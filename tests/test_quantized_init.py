"""A random-init checkpoint made directly in 4-bit: never whole in 16-bit, saved pre-quantized, and
loaded by ``from_pretrained`` as the quantization plan says, weights as made."""

from __future__ import annotations

import hashlib
import weakref

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from test_models import one_image_conversation

from vlm.bench import quantized_init
from vlm.bench.quantized_init import save_random_init_4bit
from vlm.models.families import get_family
from vlm.models.loading import load_config, load_model, load_processor
from vlm.models.lora import LoraSettings, apply_lora
from vlm.quant.config import QuantConfig


def _made_in_4bit(model_type, tiny_checkpoint, tmp_path, quant=QuantConfig()):
    family = get_family(model_type)
    source = tiny_checkpoint(model_type)
    path = tmp_path / model_type
    plan = save_random_init_4bit(family, load_config(source, family), path, quant, device="cpu",
                                 finish=getattr(family, "finish_tiny_init", None))
    load_processor(source, family).save_pretrained(path)
    return family, path, plan


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(
    "model_type, quant",
    [("mllama", QuantConfig()), ("qwen2_vl", QuantConfig()), ("llava", QuantConfig()),
     ("mllama", QuantConfig().for_strategy(shards_parameters=True))],
    ids=["mllama", "qwen2_vl", "llava", "mllama-stored-for-fsdp"],
)
def test_it_loads_as_planned_with_the_weights_it_was_made_with(model_type, quant, tiny_checkpoint, tmp_path):
    family, path, plan = _made_in_4bit(model_type, tiny_checkpoint, tmp_path, quant)
    saved = load_file(path / "model.safetensors")
    # Stored in 4-bit: every planned layer's weight is packed (in the storage dtype) with its quantization state.
    packed = {key for key, value in saved.items() if key.endswith(".weight") and f"{key}.absmax" in saved}
    assert {saved[key].dtype for key in packed} == {quant.torch_quant_storage}
    assert len(packed) == len(plan.quantized) > 0
    assert all(f"{key}.quant_state.bitsandbytes__{QuantConfig().method}" in saved for key in packed)

    model, report = load_model(str(path), family, quant)  # verifies the 4-bit layers are the planned ones
    assert report.plan.quantized == plan.quantized
    # The same packed weights (compared as a set of contents: saved names are the families' legacy
    # ones, which transformers maps while loading).
    loaded = [m.weight.data.view(torch.uint8).flatten() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert sorted(_digest(t) for t in loaded) == sorted(_digest(saved[key].view(torch.uint8).flatten()) for key in packed)


def test_a_model_made_in_4bit_trains_with_lora(tiny_checkpoint, tmp_path, one_cpu_thread):
    family, path, _ = _made_in_4bit("qwen2_vl", tiny_checkpoint, tmp_path)
    model = apply_lora(load_model(str(path), family, QuantConfig())[0], family, LoraSettings(r=4, alpha=8)).train()
    loss = model(**one_image_conversation(load_processor(str(path), family))).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero, A's grad with it


def test_no_two_layers_are_ever_in_16bit_at_once(tiny_checkpoint, tmp_path, monkeypatch):
    """Each layer's 16-bit weight is gone before the next one is made."""
    made: list[weakref.ref] = []
    real = bnb.nn.Params4bit

    def recorded(weight, *args, **kwargs):
        assert all(ref() is None for ref in made), "an earlier layer's 16-bit weight is still alive"
        made.append(weakref.ref(weight))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(quantized_init, "_params_4bit", recorded)
    _, _, plan = _made_in_4bit("mllama", tiny_checkpoint, tmp_path)
    assert len(made) == len(plan.quantized)


@pytest.mark.parametrize("quant", [QuantConfig(method="int8"), QuantConfig(policy="dynamic")], ids=["int8", "dynamic"])
def test_only_a_fixed_4bit_plan_can_be_made_in_4bit(quant, tiny_checkpoint, tmp_path):
    family = get_family("qwen2_vl")
    with pytest.raises(ValueError, match="nf4 or fp4 and a fixed policy"):
        save_random_init_4bit(family, load_config(tiny_checkpoint("qwen2_vl"), family), tmp_path, quant, device="cpu")


def test_the_90b_architecture_of_the_scale_out_run():
    import importlib.util
    from pathlib import Path

    from vlm.models.loading import model_skeleton
    from vlm.quant.policies import linear_layer_names

    script = Path(__file__).parents[1] / "scripts" / "full_size_run.py"
    spec = importlib.util.spec_from_file_location("full_size_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    family = get_family("mllama")
    skeleton = model_skeleton(family, module.mllama_90b_config())  # on the meta device: no memory
    assert sum(p.numel() for p in skeleton.parameters()) == 88_566_075_963
    text = skeleton.config.text_config
    assert (text.num_hidden_layers, len(text.cross_attention_layers), text.hidden_size) == (100, 20, 8192)
    plan = QuantConfig().resolve(linear_layer_names(skeleton), family.parts)
    assert plan.kept == ("lm_head",) and len(plan.quantized) > 700
