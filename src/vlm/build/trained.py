"""A finished run read back: which base it trained, stored how, and its adapter.

``vlm-generate``, ``vlm-eval`` and ``vlm-export`` all start from a run directory. What they need of
it is written there by training: ``metrics.json`` names the family, the checkpoint and the exact
layers kept in 16-bit; ``config.yaml`` holds the quantization settings and the data; ``adapter/``
holds the LoRA weights. The base is then loaded quantized exactly as the run trained it, so the
adapter sees the weights it learned against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm.errors import ConfigError
from vlm.models.families import ModelFamily, get_family
from vlm.quant.config import QuantConfig

if TYPE_CHECKING:
    from torch import nn

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (no adapter, another base, an unfinished run)."""


@dataclass(frozen=True)
class TrainedRun:
    """What a run directory says about the model it trained."""

    run_dir: Path
    family: ModelFamily
    checkpoint: str
    quant: QuantConfig
    kept_in_16bit: tuple[str, ...]
    max_seq_length: int
    val_urls: Any = None  # the run's validation shards (``data.val_urls``), where it had some
    status: str = "completed"

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    @property
    def name(self) -> str:
        return self.run_dir.name

    def adapter_settings(self) -> dict[str, Any]:
        """The adapter's ``adapter_config.json``; :class:`RunDirError` when the run saved none."""
        path = self.adapter_dir / ADAPTER_CONFIG
        if not path.is_file():
            raise RunDirError(
                f"{self.run_dir} has no adapter ({self.adapter_dir}/{ADAPTER_CONFIG} is missing): "
                f"the run's status is {self.status!r}; a run saves its adapter when training completes"
            )
        return json.loads(path.read_text())


def read_run(run_dir: str | Path) -> TrainedRun:
    """The run in ``run_dir``; :class:`RunDirError` naming what is missing."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise RunDirError(f"{run_dir} is not a finished training run: it has no {METRICS_FILE}")
    metrics = json.loads(metrics_path.read_text())
    missing = [key for key in ("family", "checkpoint", "kept_in_16bit") if key not in metrics]
    if missing:
        raise RunDirError(f"{metrics_path} lacks {', '.join(missing)}: was it written by vlm-train?")
    config = _run_config(run_dir)
    return TrainedRun(
        run_dir=run_dir,
        family=get_family(metrics["family"]),
        checkpoint=str(metrics["checkpoint"]),
        quant=_quant_config(config.get("quant") or {}, metrics),
        kept_in_16bit=tuple(metrics["kept_in_16bit"]),
        max_seq_length=int(metrics.get("max_seq_length") or (config.get("data") or {}).get("max_seq_length") or 2048),
        val_urls=(config.get("data") or {}).get("val_urls"),
        status=str(metrics.get("status", "completed")),
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def _quant_config(section: dict[str, Any], metrics: dict[str, Any]) -> QuantConfig:
    known = {f.name for f in fields(QuantConfig)}
    settings = {k: v for k, v in section.items() if k in known}
    settings.setdefault("method", metrics.get("quant_method", "nf4"))
    # The exact layers are in metrics.json: a calibrated policy is not calibrated again.
    settings["policy"] = "explicit" if metrics["kept_in_16bit"] else "standard"
    settings["skip_modules"] = tuple(f"^{name}$".replace(".", r"\.") for name in metrics["kept_in_16bit"])
    return QuantConfig(**settings)


def load_base(run: TrainedRun, device: str = "cpu") -> nn.Module:
    """The run's base model, quantized exactly as the run trained it (the same 4-bit layers)."""
    from vlm.models import loading
    from vlm.quant.policies import QuantPlan, linear_layer_names

    config = loading.load_config(run.checkpoint, run.family)
    names = linear_layer_names(loading.model_skeleton(run.family, config))
    kept = set(run.kept_in_16bit)
    unknown = sorted(kept - set(names))
    if unknown:
        raise RunDirError(
            f"the run kept layers in 16-bit that {run.checkpoint} does not have (e.g. {unknown[:3]}): "
            "the checkpoint is not the one the run trained"
        )
    if run.quant.quantizes:
        plan = QuantPlan(quantized=tuple(n for n in names if n not in kept), kept=tuple(n for n in names if n in kept))
    else:
        plan = QuantPlan.unquantized(names)
    model, _ = loading.load_model(run.checkpoint, run.family, run.quant, quant_plan=plan, device=device)
    return model


def attach_adapter(base: nn.Module, run: TrainedRun, *, trainable: bool = False) -> nn.Module:
    """``base`` with the run's adapter; :class:`RunDirError` when the adapter was trained on another base.

    The check is of names and shapes: every LoRA weight must sit on a layer of ``base`` with the
    width it was trained for, so nothing is dropped or silently broadcast.
    """
    from peft import PeftModel

    settings = run.adapter_settings()
    expected = (settings.get("auto_mapping") or {}).get("base_model_class")
    if expected and expected != type(base).__name__:
        raise RunDirError(
            f"the adapter in {run.adapter_dir} was trained on a {expected}, not on this {type(base).__name__}"
        )
    check_adapter_fits(base, run.adapter_dir)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir), is_trainable=trainable)
    model.eval()
    return model


def adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's saved tensors by their saved names."""
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise RunDirError(f"{adapter_dir} has no adapter_model.safetensors")
    return load_file(str(path))


def check_adapter_fits(base: nn.Module, adapter_dir: Path) -> None:
    """:class:`RunDirError` unless every saved LoRA matrix fits a linear layer of ``base``."""
    modules = dict(base.named_modules())
    problems: list[str] = []
    for key, tensor in adapter_tensors(adapter_dir).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        layer_name = key.removeprefix("base_model.model.").split(".lora_")[0]
        layer = modules.get(layer_name)
        if layer is None:
            problems.append(f"{layer_name}: no such layer")
            continue
        in_features, out_features = _layer_widths(layer)
        width = tensor.shape[1] if ".lora_A." in key else tensor.shape[0]
        wanted = in_features if ".lora_A." in key else out_features
        if width != wanted:
            problems.append(f"{key}: {width} wide, the layer {wanted}")
    if problems:
        raise RunDirError(
            f"the adapter in {adapter_dir} does not fit this base model ({len(problems)} problem(s), e.g. "
            f"{'; '.join(problems[:3])}): it was trained on another checkpoint"
        )


def _layer_widths(layer: Any) -> tuple[int, int]:
    base_layer = getattr(layer, "base_layer", layer)
    return int(base_layer.in_features), int(base_layer.out_features)


def load_trained(run: TrainedRun, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The run's model (quantized base + adapter, eval mode) and its processor."""
    from vlm.models.loading import load_processor

    return attach_adapter(load_base(run, device), run), load_processor(run.checkpoint, run.family)
