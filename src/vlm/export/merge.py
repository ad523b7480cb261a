"""The ``merged`` form: the run's base dequantized, the adapter merged in, saved as a plain checkpoint.

Steps, each checked: the base is loaded quantized exactly as the run trained it; every 4-bit or
8-bit linear layer becomes an ``nn.Linear`` with its dequantized weight (layers the run kept in
16-bit stay as they are); the adapter is attached (refused when it was trained on another base);
each LoRA layer is merged by PEFT and its weight compared with base + delta; the LoRA wrappers
are unloaded; the model is saved with ``save_pretrained`` (safetensors shards, config without a
``quantization_config``, generation config) beside the run's processor. The result loads with
``AutoModelForImageTextToText.from_pretrained`` and serves in vLLM like any checkpoint of its family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlm.build.trained import TrainedRun

from .adapter import AdapterLayers, read_adapter_layers
from .report import ExportError, ExportReport, check_out_dir, prepare_out_dir, written_files

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained gives the adapter it loads


class MergeError(ExportError):
    """A merge that would leave some of the adapter out of the merged weights."""


@dataclass(frozen=True)
class MergeSettings:
    """``dtype``: of every saved weight; ``max_shard_size``: per safetensors file (``"5GB"`` or bytes);
    ``device``: where the base is loaded, dequantized and merged."""

    dtype: str = "bfloat16"
    max_shard_size: str | int = "5GB"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ExportError(f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class MergeResult:
    layers: int  # LoRA layers merged
    tensors: int  # LoRA matrices merged (two per layer)
    dequantized: int  # quantized linear layers turned into plain ones


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers of a PEFT model by the full name of the base model's layer."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(model: nn.Module, adapter: AdapterLayers) -> tuple[nn.Module, int]:
    """Merge the loaded adapter of the PEFT ``model`` into its base layers and unload PEFT's wrappers.

    Returns the plain model and the number of layers merged. Raises :class:`MergeError` unless
    every layer of ``adapter`` (what the adapter file holds) was loaded with the file's values,
    merged to the precision of the weight (merged weight = weight + delta, up to one rounding of
    the weight's dtype per addend), and no LoRA parameter is left after unloading.
    """
    wrapped = lora_layers(model)
    loaded = {name for name, layer in wrapped.items() if ADAPTER_NAME in layer.lora_A}
    _same_layers(set(adapter.layers), loaded)
    for name in adapter.layers:
        _check_loaded_values(name, wrapped[name], adapter.matrices[name])
    for name in adapter.layers:
        _merge_one(name, wrapped[name])
    merged = sum(ADAPTER_NAME in layer.merged_adapters for layer in wrapped.values())
    if merged != len(adapter.layers):
        raise MergeError(f"merged {merged} of the adapter's {len(adapter.layers)} LoRA layers")
    plain = model.unload()
    leftover = [name for name, _ in plain.named_parameters() if "lora_" in name]
    if leftover or lora_layers(plain):
        raise MergeError(f"LoRA parameters remain after unloading the merged model, e.g. {leftover[:3]}")
    return plain, merged


def _same_layers(in_file: set[str], loaded: set[str]) -> None:
    missing, extra = sorted(in_file - loaded), sorted(loaded - in_file)
    if missing or extra:
        raise MergeError(
            f"PEFT loaded LoRA on {len(loaded)} layers but the adapter file holds {len(in_file)}: "
            f"{len(missing)} in the file but not loaded (e.g. {missing[:3]}; is adapter_config.json's "
            f"target_modules missing them?), {len(extra)} loaded but not in the file (e.g. {extra[:3]})"
        )


def _check_loaded_values(name: str, layer: nn.Module, saved: dict) -> None:
    for matrix in ("lora_A", "lora_B"):
        weight = getattr(layer, matrix)[ADAPTER_NAME].weight
        if not torch.equal(weight.detach().cpu(), saved[matrix].to(weight.dtype)):
            raise MergeError(f"{name}.{matrix} as loaded differs from the adapter file: the adapter did not load as saved")


@torch.no_grad()
def _merge_one(name: str, layer: nn.Module) -> None:
    """Merge one layer with PEFT; :class:`MergeError` unless its weight is now base + delta (for plain LoRA)."""
    weight = layer.get_base_layer().weight
    variant = ADAPTER_NAME in getattr(layer, "lora_variant", {})  # e.g. DoRA: PEFT's own merge rule
    before = None if variant else weight.detach().clone()  # one layer at a time: one weight's worth of memory
    delta = None if variant else layer.get_delta_weight(ADAPTER_NAME).detach()
    layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
    if ADAPTER_NAME not in layer.merged_adapters:
        raise MergeError(f"PEFT did not merge the adapter into {name}")
    if variant:
        return
    after = layer.get_base_layer().weight.detach()
    expected = before.float() + delta.float()
    # One rounding of the delta to the weight's dtype and one of the sum, each within eps * magnitude.
    finfo = torch.finfo(after.dtype)
    bound = finfo.eps * (expected.abs() + delta.float().abs()) + finfo.tiny
    if not bool(((after.float() - expected).abs() <= bound).all()):
        worst = float((after.float() - expected).abs().max())
        raise MergeError(f"the merged weight of {name} is not weight + LoRA delta (off by up to {worst:.3g})")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``model`` in ``dtype`` (the layers kept in 16-bit, norms, embeddings).

    Parameters only: ``model.to(dtype)`` would also round buffers that are computed rather than
    saved, such as rotary inverse frequencies, and the model in memory would then differ from
    the checkpoint it saves.
    """
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def merged_model(run: TrainedRun, settings: MergeSettings = MergeSettings()) -> tuple[nn.Module, MergeResult]:
    """The run's base, dequantized to ``settings.dtype``, with its adapter merged in (eval mode)."""
    from vlm.build.trained import attach_adapter, load_base

    from .dequantize import dequantize_linear_layers

    run.adapter_settings()  # RunDirError when the run saved no adapter
    adapter = read_adapter_layers(run.adapter_dir)
    base = load_base(run, settings.device)
    dequantized = dequantize_linear_layers(base, settings.torch_dtype)
    cast_parameters(base, settings.torch_dtype)
    peft_model = attach_adapter(base, run)  # RunDirError for an adapter of another base
    model, layers = merge_lora(peft_model, adapter)
    model.config.dtype = settings.torch_dtype
    model.eval()
    return model, MergeResult(layers=layers, tensors=adapter.tensor_count, dequantized=len(dequantized))


def export_merged(run: TrainedRun, out_dir: str | Path, settings: MergeSettings = MergeSettings()) -> ExportReport:
    """Write the merged checkpoint of ``run`` with its processor into ``out_dir`` (empty or new)."""
    check_out_dir(out_dir)
    model, result = merged_model(run, settings)
    return save_merged(model, result, run, out_dir, settings)


def save_merged(
    model: nn.Module, result: MergeResult, run: TrainedRun, out_dir: str | Path, settings: MergeSettings = MergeSettings()
) -> ExportReport:
    """Save a :func:`merged_model` of ``run`` and the run's processor into ``out_dir`` (empty or new)."""
    from vlm.models.loading import load_processor

    processor = load_processor(run.checkpoint, run.family)
    out = prepare_out_dir(out_dir)
    model.save_pretrained(out, max_shard_size=settings.max_shard_size)
    processor.save_pretrained(out)
    _check_saved_config(out, str(model.dtype).removeprefix("torch."))
    return ExportReport(
        form="merged",
        out_dir=out,
        lora_layers=result.layers,
        lora_tensors=result.tensors,
        files=written_files(out),
        notes=(f"{result.dequantized} quantized linear layers dequantized to {model.dtype}".replace("torch.", ""),),
    )


def _check_saved_config(out: Path, dtype: str) -> None:
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise ExportError(f"{out / 'config.json'} still holds a quantization_config: the merged model is not plain")
    if config.get("dtype", config.get("torch_dtype")) != dtype:
        raise ExportError(f"{out / 'config.json'} gives dtype {config.get('dtype')!r}, not {dtype!r}")
