"""bitsandbytes on the CPU: whichever CPU the suite lands on, a loaded 4-bit model trains after validating.

Two bitsandbytes CPU defects are in the way (0.49 to 0.50.2). On a CPU with AVX512-BF16 a
``Linear4bit`` repacks its weight in place for inference the first time it runs in eval mode
without grad; and its CPU dequantization misreads weights whose rows are not a whole number of
64-element blocks. Loading switches the first off; the second is refused before loading, and the
tiny models have the widths real checkpoints have. The tests that need AVX512-BF16 to show the
defect skip elsewhere; the path of CPUs without it is forced in ``test_train_cli.py``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from vlm.errors import ConfigError
from vlm.kernels.qlora_linear import dequantize_nf4_reference
from vlm.models.families import FAMILIES, TinySize, get_family
from vlm.models.families.llava import Llava
from vlm.models.loading import load_model
from vlm.models.lora import LoraSettings, apply_lora
from vlm.models.tiny import build_tiny_checkpoint
from vlm.quant.bnb_layers import (
    CPU_KERNEL_NOTICES,
    keep_cpu_weights_trainable,
    misread_on_cpu,
    repacks_on_cpu,
)
from vlm.quant.config import QuantConfig

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16  # noqa: E402

needs_avx512_bf16 = pytest.mark.skipif(not has_avx512bf16(), reason="this CPU has no AVX512-BF16")


def four_bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def quantized_layer(in_features: int = 128, out_features: int = 64) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features) / in_features**0.5, requires_grad=False, quant_type="nf4"
    )
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_loading_switches_off_the_in_place_cpu_repacking_of_every_4bit_layer(tiny_checkpoint, model_type):
    family = get_family(model_type)
    model, _ = load_model(tiny_checkpoint(model_type), family, QuantConfig())
    layers = four_bit_layers(model)
    assert layers
    assert [name for name, layer in layers if repacks_on_cpu(layer)] == []


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_bitsandbytes_dequantizes_every_4bit_layer_of_the_tiny_models_exactly_on_the_cpu(tiny_checkpoint, model_type):
    model, _ = load_model(tiny_checkpoint(model_type), get_family(model_type), QuantConfig())
    for name, layer in four_bit_layers(model):
        weight = layer.weight
        assert layer.in_features % 64 == 0, name
        assert torch.equal(dequantize_4bit(weight.data, weight.quant_state), dequantize_nf4_reference(weight.data, weight.quant_state)), name


def test_layers_whose_rows_bitsandbytes_misreads_on_the_cpu_are_refused_before_loading(tmp_path):
    assert misread_on_cpu([("a", 128), ("b", 96), ("c", 32), ("d", 64)]) == ["b", "c"]
    family = Llava(tiny=TinySize(vision_hidden_size=96, vision_heads=1))
    checkpoint = build_tiny_checkpoint(family, tmp_path / "llava-96", ["a picture"])
    with pytest.raises(ConfigError, match=r"not a multiple of 64 wide .*vision_tower.*quant.skip_modules"):
        load_model(str(checkpoint), family, QuantConfig())
    # Kept in 16-bit, the same layers load and nothing is misread.
    model, _ = load_model(str(checkpoint), family, QuantConfig(policy="vision_skip"))
    assert all(layer.in_features % 64 == 0 for _, layer in four_bit_layers(model))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_a_quantized_model_validates_trains_validates_and_trains_again(tiny_checkpoint, one_cpu_thread, method):
    family = get_family("qwen2_vl")
    model, _ = load_model(tiny_checkpoint("qwen2_vl"), family, QuantConfig(method=method))
    packed_after_loading = {name: layer.weight.data.clone() for name, layer in four_bit_layers(model)}
    model = apply_lora(model, family, LoraSettings(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 200, (2, 24), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    def validate() -> float:
        model.eval()
        with torch.no_grad():  # the situation in which bitsandbytes would repack the weights
            return model(**batch).loss.item()

    def train(steps: int) -> None:
        model.train()
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    losses = [validate()]
    train(3)
    losses.append(validate())
    train(3)
    losses.append(validate())

    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[1] < losses[0]
    for name, layer in four_bit_layers(model):
        assert torch.equal(layer.weight.data, packed_after_loading[name.removeprefix("base_model.model.").replace(".base_layer", "")])


@needs_avx512_bf16
def test_on_this_cpu_an_unguarded_layer_repacks_in_eval_and_the_guard_restores_its_weight():
    torch.manual_seed(0)
    layer = quantized_layer()
    weight_before = dequantize_nf4_reference(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert repacks_on_cpu(layer)
    with torch.no_grad():
        layer.eval()(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "bitsandbytes no longer repacks"

    assert keep_cpu_weights_trainable(layer) == 1
    assert not repacks_on_cpu(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # The repacking rounded the block scales to bf16, so the way back is close but not exact:
    # which is why loading guards every layer before its first eval pass.
    restored = dequantize_nf4_reference(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(restored, weight_before, atol=0, rtol=2**-7)
    with torch.no_grad():
        layer.eval()(x)
    assert torch.equal(dequantize_nf4_reference(layer.weight.data, layer.weight.quant_state), restored)
    x.requires_grad_(True)
    layer.train()(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("logger_name", "prefix"), CPU_KERNEL_NOTICES, ids=["bitsandbytes", "hub_kernels"])
def test_the_entry_points_drop_the_cpu_kernel_lookups_notices_and_keep_their_loggers_others(logger_name, prefix,
                                                                                            monkeypatch):
    """bitsandbytes asks for its CPU kernel on AVX512-BF16 CPUs only, so the notices are emitted here by hand; that
    the installed libraries still log them under these names is read from their source."""
    from vlm.cli.console import quiet_libraries

    package = logger_name.partition(".")[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (transformers before 5.25 does not need it)")
    source = Path(importlib.util.find_spec(logger_name).origin).read_text()
    assert prefix.partition("'")[0] in source and "getLogger(__name__)" in source

    monkeypatch.delenv("WANDB_SILENT", raising=False)  # quiet_libraries sets it; restored after the test
    quiet_libraries()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        logger.warning(prefix + " (as the library words it)")
        logger.warning("another notice of the same library")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another notice of the same library"]
