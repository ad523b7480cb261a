"""Model families: tiny checkpoints round-trip through from_pretrained and train as QLoRA on the CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import transformers
from PIL import Image

from vlm.models.checkpointing import enable_checkpointing
from vlm.models.families import FAMILIES, get_family
from vlm.models.loading import (
    QuantizationMismatch,
    load_model,
    load_processor,
    verify_quantized,
)
from vlm.models.lora import LoraSettings, apply_lora
from vlm.quant.bnb_layers import quantized_layer_names
from vlm.quant.config import QuantConfig
from vlm.quant.policies import QuantPlan

ALL_FAMILIES = sorted(FAMILIES)


def one_image_conversation(processor, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[[Image.fromarray(pixels)]], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return dict(batch)


def qlora_with_live_adapters(path: str, family, quant: QuantConfig | None = None) -> torch.nn.Module:
    """A tiny 4-bit model of ``family`` with LoRA r 4 whose B is not zero, so that every LoRA grad is non-zero."""
    torch.manual_seed(0)
    model = apply_lora(load_model(path, family, quant or QuantConfig())[0], family, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return model


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward from zero grads: the loss and each trainable weight's grad."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_tiny_checkpoint_round_trips_through_from_pretrained(model_type, tiny_checkpoint):
    family = get_family(model_type)
    path = tiny_checkpoint(model_type)
    config = transformers.AutoConfig.from_pretrained(path)
    assert config.model_type == model_type
    model = family.model_class.from_pretrained(path, dtype=torch.bfloat16)
    # The loaded weights are the saved ones: the tiny build is the seed-0 init of this config.
    torch.manual_seed(0)
    expected_model = family.model_class(config)
    family.finish_tiny_init(expected_model)
    expected = expected_model.to(torch.bfloat16).state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    torch.manual_seed(1)
    other_init = family.model_class(config).to(torch.bfloat16).state_dict()
    assert not all(torch.equal(loaded[k], other_init[k]) for k in expected)

    processor = load_processor(path, family)
    assert processor.chat_template and family.image_token in processor.tokenizer.get_vocab()
    batch = one_image_conversation(processor)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    assert (batch["input_ids"] == image_token_id).any()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_qlora_train_step_changes_only_lora_weights(model_type, tiny_checkpoint):
    family = get_family(model_type)
    path = tiny_checkpoint(model_type)
    model, report = load_model(path, family, QuantConfig())

    # The standard recipe: every linear layer of the model is 4-bit except lm_head.
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert report.plan.kept == ("lm_head",)
    assert set(quantized_layer_names(model)) == set(report.plan.quantized)
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in report.plan.quantized)
    assert set(linear_names) == set(report.plan.quantized) | {"lm_head"}
    frozen_dtypes = {p.dtype for p in model.parameters()}
    assert torch.float32 not in frozen_dtypes  # no fp32 copies of frozen weights

    model = apply_lora(model, family, LoraSettings(r=4, alpha=8))
    enable_checkpointing(model, "standard")
    model.train()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    # LoRA only on the language model's decoder linears.
    assert all(f"{family.language_model}.layers." in n for n in lora_before)

    optimizer = torch.optim.AdamW(lora_before and [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = one_image_conversation(load_processor(path, family))
    for _ in range(2):  # lora_B starts at zero: the first step moves B, the second also A
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = dict(model.named_parameters())
    unchanged = [n for n, before in lora_before.items() if torch.equal(after[n].detach(), before)]
    assert not unchanged
    assert all(torch.equal(after[n].detach(), before) for n, before in frozen_before.items())
    assert all(after[n].dtype == before.dtype for n, before in frozen_before.items())


def test_verification_names_layers_that_differ_from_the_plan(tiny_checkpoint):
    family = get_family("llava")
    model, report = load_model(tiny_checkpoint("llava"), family, QuantConfig())
    wrong = QuantPlan(quantized=report.plan.quantized[1:] + ("lm_head",), kept=())
    with pytest.raises(QuantizationMismatch, match="lm_head"):
        verify_quantized(model, wrong)


def test_a_checkpoint_of_another_family_is_refused_before_loading_weights(tiny_checkpoint):
    with pytest.raises(ValueError, match="model.family='llava'.*'qwen2_vl'"):
        load_model(tiny_checkpoint("qwen2_vl"), get_family("llava"), QuantConfig())


def test_invalid_lora_settings_name_the_key():
    with pytest.raises(ValueError, match=r"lora\.r=0"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match=r"lora\.dropout"):
        LoraSettings(dropout=1.5)
