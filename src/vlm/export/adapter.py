"""The adapter of a run, read layer by layer, and the ``adapter`` form: the adapter as PEFT saved it.

The ``adapter`` form is self-contained beside its base: the adapter's own files
(``adapter_config.json``, ``adapter_model.safetensors``, PEFT's model card) and the run's processor
(tokenizer, image processor, chat template), so the processor that rendered the training prompts
travels with the weights. Loading it needs the base checkpoint the run trained on
(``base_model_name_or_path``), quantized as the run quantized it for the closest match.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.build.trained import RunDirError, TrainedRun, adapter_tensors, check_adapter_fits

from .report import ExportError, ExportReport, check_out_dir, prepare_out_dir, written_files

SAVED_PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name
MATRICES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class AdapterLayers:
    """The adapter's LoRA matrices by layer (full module names of the base model); ``other``: the
    saved tensors that are not LoRA matrices (e.g. DoRA magnitudes), by saved name."""

    matrices: dict[str, dict[str, Any]]  # layer -> {"lora_A": tensor [r, in], "lora_B": tensor [out, r]}
    other: dict[str, Any]

    @property
    def layers(self) -> list[str]:
        return sorted(self.matrices)

    @property
    def tensor_count(self) -> int:
        return sum(len(pair) for pair in self.matrices.values())


def saved_name(layer: str, matrix: str) -> str:
    """The name PEFT saves a LoRA matrix of ``layer`` under."""
    return f"{SAVED_PREFIX}{layer}.{matrix}.weight"


def read_adapter_layers(adapter_dir: Path) -> AdapterLayers:
    """The adapter's tensors grouped by layer; :class:`ExportError` when a layer lacks one of its two matrices."""
    matrices: dict[str, dict[str, Any]] = {}
    other: dict[str, Any] = {}
    for key, tensor in adapter_tensors(adapter_dir).items():
        layer, matrix = _split(key)
        if layer is None:
            other[key] = tensor
        else:
            matrices.setdefault(layer, {})[matrix] = tensor
    incomplete = sorted(layer for layer, pair in matrices.items() if set(pair) != set(MATRICES))
    if incomplete:
        raise ExportError(f"the adapter in {adapter_dir} lacks lora_A or lora_B of {len(incomplete)} layer(s), "
                          f"e.g. {incomplete[:3]}: the file is damaged")
    if not matrices:
        raise ExportError(f"the adapter in {adapter_dir} holds no LoRA matrices")
    return AdapterLayers(matrices, other)


def _split(key: str) -> tuple[str | None, str]:
    for matrix in MATRICES:
        suffix = f".{matrix}.weight"
        if key.endswith(suffix):
            return key.removeprefix(SAVED_PREFIX).removesuffix(suffix), matrix
    return None, ""


def check_fits_base(run: TrainedRun) -> None:
    """:class:`~vlm.build.trained.RunDirError` unless the run's adapter fits its base checkpoint by
    class, layer names and widths; checked on the weightless skeleton (no weights are loaded)."""
    from vlm.models import loading

    skeleton = loading.model_skeleton(run.family, loading.load_config(run.checkpoint, run.family))
    expected = (run.adapter_settings().get("auto_mapping") or {}).get("base_model_class")
    if expected and expected != type(skeleton).__name__:
        raise RunDirError(
            f"the adapter in {run.adapter_dir} was trained on a {expected}, not on this {type(skeleton).__name__}"
        )
    check_adapter_fits(skeleton, run.adapter_dir)


def export_adapter(run: TrainedRun, out_dir: str | Path) -> ExportReport:
    """Copy the run's adapter and save its processor into ``out_dir`` (empty or new)."""
    from vlm.models.loading import load_processor

    check_out_dir(out_dir)
    run.adapter_settings()  # RunDirError when the run saved no adapter
    check_fits_base(run)
    layers = read_adapter_layers(run.adapter_dir)
    out = prepare_out_dir(out_dir)
    for path in sorted(run.adapter_dir.iterdir()):
        if path.is_file():
            shutil.copy2(path, out / path.name)
    load_processor(run.checkpoint, run.family).save_pretrained(out)
    return ExportReport(
        form="adapter",
        out_dir=out,
        lora_layers=len(layers.layers),
        lora_tensors=layers.tensor_count,
        files=written_files(out),
        notes=(f"base checkpoint: {run.checkpoint}",),
    )
