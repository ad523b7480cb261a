"""The ``vllm`` form: the adapter alone, under the module names vLLM's LoRA serving reads.

How vLLM reads an adapter (``LoRAModel.from_local_checkpoint`` in vllm/lora/lora_model.py, earlier
vllm/lora/models.py, and ``parse_fine_tuned_lora_name`` in vllm/lora/utils.py; read at vLLM main of
late 2025): it opens ``adapter_model.safetensors`` and ``adapter_config.json``, strips ``base_model.model.`` from each
tensor name, renames the rest with the model's ``hf_to_vllm_mapper`` (the renaming it applies to
the checkpoint's own weights) and puts the matrix on the module of that name. Only layers of the
language model get LoRA; LoRA on the vision tower or the projector is ignored with a warning
(vllm/lora/model_manager.py), except behind the experimental ``enable_tower_connector_lora``.

transformers 5 names the modules ``model.language_model.layers.N...``, ``model.visual...``,
``model.vision_tower...``, ``model.multi_modal_projector...``; the checkpoints on the Hub, and
those ``save_pretrained`` writes, keep the older layout (``model.layers.N...`` for Qwen2-VL,
``language_model.model.layers.N...`` for LLaVA), which is what each family's ``hf_to_vllm_mapper``
maps from in every vLLM release with LoRA for the family (the newer names only in recent ones).
(Older releases' Qwen2.5-VL mapper maps only ``lm_head.`` and ``model.``, which would turn the
newer names into ``language_model.model.language_model...``.) So the adapter is written under the checkpoint
layout, ``base_model.model.<checkpoint module name>.lora_A.weight``, and a test checks those
names against the checkpoint's own weight names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.build.trained import ADAPTER_CONFIG, TrainedRun

from .adapter import AdapterLayers, check_fits_base, read_adapter_layers, saved_name
from .report import ExportError, ExportReport, check_out_dir, prepare_out_dir, written_files

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class VllmLayoutError(ExportError):
    """An adapter that vLLM would not serve as trained."""


@dataclass(frozen=True)
class VllmLayout:
    """Where a family's checkpoints keep the language model: ``language_model`` is the prefix of its
    layers in the checkpoint layout (transformers 5 calls it ``model.language_model.``)."""

    architecture: str
    language_model: str

    def module_name(self, name: str, trained_prefix: str) -> str:
        """``name`` (a transformers 5 module name under ``trained_prefix``) in the checkpoint layout."""
        if not name.startswith(trained_prefix):
            raise VllmLayoutError(f"{name} is not a layer of the language model ({trained_prefix}...)")
        return self.language_model + name.removeprefix(trained_prefix)


# The checkpoint prefixes are what each family's hf_to_vllm_mapper maps to vLLM's language model
# (to "language_model.model.") in vllm/model_executor/models/qwen2_vl.py, qwen2_5_vl.py, llava.py,
# gemma3_mm.py and qwen3_vl.py. Qwen3-VL was released after transformers 4.52: its checkpoints
# already use the newer names, which its mapper reads. Idefics3 (and SmolVLM, its subclass in
# vllm/model_executor/models/smolvlm.py) has no mapper: vLLM's module names are the checkpoint's.
VLLM_LAYOUTS: dict[str, VllmLayout] = {
    "qwen2_vl": VllmLayout("Qwen2VLForConditionalGeneration", "model."),
    "qwen2_5_vl": VllmLayout("Qwen2_5_VLForConditionalGeneration", "model."),
    "llava": VllmLayout("LlavaForConditionalGeneration", "language_model.model."),
    "gemma3": VllmLayout("Gemma3ForConditionalGeneration", "language_model.model."),
    "qwen3_vl": VllmLayout("Qwen3VLForConditionalGeneration", "model.language_model."),
    "idefics3": VllmLayout("Idefics3ForConditionalGeneration", "model.text_model."),
    "smolvlm": VllmLayout("SmolVLMForConditionalGeneration", "model.text_model."),
}
# Families vLLM serves no LoRA for, and why (the LoRA column of vLLM's docs/models/supported_models.md).
NO_VLLM_LORA: dict[str, str] = {
    "llava_next": "vLLM's LlavaNextForConditionalGeneration does not support LoRA adapters (it does not "
    "implement SupportsLoRA)",
    "mllama": "vLLM never served LoRA adapters for Mllama (its encoder-decoder models had no LoRA) and "
    "dropped Mllama with its encoder-decoder support (vllm-project/vllm#24907, vLLM 0.11)",
}


def vllm_layout(model_type: str) -> VllmLayout:
    """The family's :class:`VllmLayout`; :class:`VllmLayoutError` saying why vLLM cannot serve its adapters."""
    if model_type in VLLM_LAYOUTS:
        return VLLM_LAYOUTS[model_type]
    why = NO_VLLM_LORA.get(model_type, f"no vLLM LoRA layout is known for {model_type}")
    raise VllmLayoutError(f"--form vllm: {why}; export --form merged and serve the merged checkpoint instead")


def vllm_tensors(layers: AdapterLayers, layout: VllmLayout, language_model: str) -> dict[str, Any]:
    """The adapter's matrices under vLLM's names; :class:`VllmLayoutError` for layers vLLM would not adapt.

    ``language_model``: the family's module prefix of its language model (``model.language_model``).
    """
    prefix = f"{language_model}."
    outside = [name for name in layers.layers if not name.startswith(prefix)]
    if outside:
        raise VllmLayoutError(
            f"--form vllm: the adapter has LoRA on {len(outside)} layer(s) outside the language model "
            f"(e.g. {outside[:3]}), which vLLM ignores when it serves LoRA: the served model would differ "
            "from the trained one; export --form merged instead"
        )
    if layers.other:
        raise VllmLayoutError(
            f"--form vllm: the adapter holds tensors other than LoRA matrices (e.g. {sorted(layers.other)[:3]}), "
            "which vLLM does not read; export --form merged instead"
        )
    return {
        saved_name(layout.module_name(name, prefix), matrix): tensor.contiguous()
        for name, pair in layers.matrices.items()
        for matrix, tensor in pair.items()
    }


def vllm_adapter_config(
    settings: dict[str, Any], layers: AdapterLayers, layout: VllmLayout, language_model: str
) -> dict[str, Any]:
    """``adapter_config.json`` for vLLM: the run's, with ``target_modules`` under vLLM's names.

    ``target_modules`` becomes the exact renamed layers the tensors hold (PEFT may have saved the
    list shortened to suffixes, which would not rename); :class:`VllmLayoutError` for settings
    vLLM refuses.
    """
    unsupported = {
        "use_dora": bool(settings.get("use_dora")),
        "modules_to_save": bool(settings.get("modules_to_save")),
        "rank_pattern": bool(settings.get("rank_pattern")),
        "alpha_pattern": bool(settings.get("alpha_pattern")),
        "bias": settings.get("bias", "none") != "none",
    }
    used = [key for key, on in unsupported.items() if on]
    if used:
        raise VllmLayoutError(f"--form vllm: the adapter sets {', '.join(used)}, which vLLM's LoRA serving does not "
                              "support; export --form merged instead")
    config = dict(settings)
    config["target_modules"] = sorted(layout.module_name(name, f"{language_model}.") for name in layers.layers)
    return config


def export_vllm(run: TrainedRun, out_dir: str | Path) -> ExportReport:
    """Write the run's adapter in vLLM's layout into ``out_dir`` (empty or new)."""
    from safetensors.torch import save_file

    check_out_dir(out_dir)
    layout = vllm_layout(run.family.model_type)
    settings = run.adapter_settings()
    check_fits_base(run)
    layers = read_adapter_layers(run.adapter_dir)
    tensors = vllm_tensors(layers, layout, run.family.language_model)
    config = vllm_adapter_config(settings, layers, layout, run.family.language_model)
    out = prepare_out_dir(out_dir)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    rank = int(settings.get("r") or 0)
    # vLLM sizes its LoRA buffers by --max-lora-rank (16 unless given) and refuses adapters above it.
    rank_flag = f" --max-lora-rank {rank}" if rank > 16 else ""
    return ExportReport(
        form="vllm",
        out_dir=out,
        lora_layers=len(layers.layers),
        lora_tensors=len(tensors),
        files=written_files(out),
        notes=(f"serve with: vllm serve {run.checkpoint} --enable-lora{rank_flag} --lora-modules {run.name}={out}",),
    )
