"""Loading a checkpoint (a local directory or a Hub name) the way real checkpoints load: ``from_pretrained``.

The quantization plan is resolved to exact module names against the model's real module tree
(built on the meta device, no weights) before loading, handed to bitsandbytes as the skip list,
and verified afterwards: the ``Linear4bit`` layers must be exactly the planned ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from vlm.errors import ConfigError
from vlm.quant.bnb_layers import (
    keep_cpu_weights_trainable,
    misread_on_cpu,
    quantized_layer_names,
)
from vlm.quant.config import QuantConfig
from vlm.quant.policies import QuantPlan, linear_layer_names

from .families import ModelFamily
from .families.base import slow_image_processor_class


class QuantizationMismatch(RuntimeError):
    """The loaded model's quantized layers are not the planned ones."""


@dataclass(frozen=True)
class LoadReport:
    checkpoint: str
    plan: QuantPlan
    quantized_linear_layers: int
    kept_linear_layers: int

    def summary(self) -> str:
        return (
            f"loaded {self.checkpoint}: {self.quantized_linear_layers} linear layers quantized, "
            f"{self.kept_linear_layers} kept in 16-bit"
        )


def load_config(checkpoint: str, family: ModelFamily) -> transformers.PretrainedConfig:
    """The checkpoint's config; raises ``ValueError`` if it belongs to another family."""
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    if config.model_type != family.model_type:
        raise ValueError(
            f"model.family={family.model_type!r} but the checkpoint {checkpoint!r} is a {config.model_type!r} model"
        )
    return config


def model_skeleton(family: ModelFamily, config: transformers.PretrainedConfig) -> nn.Module:
    """The model without weights (on the meta device): its module tree and shapes, for free."""
    with torch.device("meta"):
        return family.model_class(config)


def bitsandbytes_config(quant: QuantConfig, keep: tuple[str, ...]) -> transformers.BitsAndBytesConfig | None:
    if not quant.quantizes:
        return None
    # Full module names: transformers releases match skip entries differently (prefix, regex or
    # suffix), and an exact full name means the same thing to all of them.
    skip = list(keep)
    if quant.method == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=quant.torch_compute_dtype,
        bnb_4bit_quant_storage=quant.torch_quant_storage,
        llm_int8_skip_modules=skip,
    )


def load_model(
    checkpoint: str,
    family: ModelFamily,
    quant: QuantConfig,
    *,
    quant_plan: QuantPlan | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> tuple[nn.Module, LoadReport]:
    """Load ``checkpoint`` onto ``device`` quantized as ``quant_plan`` (default: ``quant``'s policy
    resolved here); frozen weights in the compute dtype.

    Raises ``QuantizationMismatch`` when the quantized layers differ from the plan.
    """
    if quant_plan is None and quant.calibrates:
        raise ValueError("quant.policy=dynamic needs the calibrated plan (vlm.build.planning.plan_checkpoint)")
    config = load_config(checkpoint, family)
    on_cpu_in_4bit = torch.device(device).type == "cpu" and quant.method in ("nf4", "fp4")
    skeleton = model_skeleton(family, config) if quant_plan is None or on_cpu_in_4bit else None
    if quant_plan is None:
        quant_plan = quant.resolve(linear_layer_names(skeleton), family.parts)
    if on_cpu_in_4bit:
        refuse_misread_layers(skeleton, quant_plan)
    kwargs: dict[str, Any] = {
        "dtype": quant.torch_compute_dtype,
        "device_map": {"": str(device)},
        "quantization_config": bitsandbytes_config(quant, quant_plan.kept),
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = family.model_class.from_pretrained(checkpoint, **kwargs)
    verify_quantized(model, quant_plan)
    keep_cpu_weights_trainable(model)
    family.prepare_loaded(model)
    report = LoadReport(
        checkpoint=str(checkpoint),
        plan=quant_plan,
        quantized_linear_layers=len(quant_plan.quantized),
        kept_linear_layers=len(quant_plan.kept),
    )
    return model, report


def refuse_misread_layers(skeleton: nn.Module, quant_plan: QuantPlan) -> None:
    """Raise ``ConfigError`` when a planned 4-bit layer is one that bitsandbytes' CPU kernels misread.

    Checked before loading: training such a layer on the CPU would run on wrong weights without
    any error (see :func:`vlm.quant.bnb_layers.misread_on_cpu`).
    """
    widths = ((name, skeleton.get_submodule(name).in_features) for name in quant_plan.quantized)
    misread = misread_on_cpu(widths)
    if misread:
        raise ConfigError(
            f"{len(misread)} layer(s) planned in 4-bit have rows that are not a multiple of 64 wide "
            f"(e.g. {misread[:3]}), which bitsandbytes' CPU dequantization gets wrong: keep them in "
            "16-bit with quant.skip_modules, or train on a GPU"
        )


def verify_quantized(model: nn.Module, quant_plan: QuantPlan) -> None:
    """Raise ``QuantizationMismatch`` unless the quantized layers are exactly ``quant_plan.quantized``."""
    found = set(quantized_layer_names(model))
    planned = set(quant_plan.quantized)
    if found != planned:
        missing = sorted(planned - found)[:5]
        extra = sorted(found - planned)[:5]
        raise QuantizationMismatch(
            f"quantized layers differ from the plan: {len(planned - found)} planned but not quantized "
            f"(e.g. {missing}), {len(found - planned)} quantized but not planned (e.g. {extra})"
        )


def load_processor(checkpoint: str, family: ModelFamily) -> Any:
    """The checkpoint's processor (tokenizer, image processor and chat template) via ``from_pretrained``."""
    if family.image_only_processor is None:
        return transformers.AutoProcessor.from_pretrained(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    return family.image_only_processor(
        image_processor=_slow_image_processor(checkpoint),
        tokenizer=tokenizer,
        chat_template=_processor_chat_template(checkpoint) or tokenizer.chat_template,
        **_processor_settings(checkpoint, family.image_only_processor),
    )


def _processor_settings(checkpoint: str, processor_class: type) -> dict[str, Any]:
    """The processor's own saved arguments that ``processor_class`` takes (SmolVLM's and Idefics3's
    ``image_seq_len``, the tokens an image tile becomes), from the checkpoint's ``processor_config.json``."""
    import inspect
    import json

    from transformers.utils import cached_file

    path = cached_file(checkpoint, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    if not path:
        return {}
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    taken = set(inspect.signature(processor_class.__init__).parameters) - {"self", "chat_template", "args", "kwargs"}
    return {key: value for key, value in saved.items() if key in taken and key not in ("image_processor", "tokenizer")}


def _slow_image_processor(checkpoint: str) -> Any:
    """The checkpoint's image processor, PIL-backed (AutoImageProcessor may insist on torchvision)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    settings, _ = ImageProcessingMixin.get_image_processor_dict(checkpoint)
    cls = slow_image_processor_class(settings["image_processor_type"])
    return cls.from_pretrained(checkpoint)


def _processor_chat_template(checkpoint: str) -> str | None:
    """The processor's own chat template file, which can differ from the tokenizer's."""
    import json

    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(checkpoint, filename, _raise_exceptions_for_missing_entries=False)
        if path:
            text = open(path, encoding="utf-8").read()
            return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return None
