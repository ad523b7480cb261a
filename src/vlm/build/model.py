"""How a model is built for training, in fixed steps: load → verify → LoRA → frozen parts → kernels →
checkpointing → compile.

Each step takes the model, returns it, and says in one line what it did. Every step after loading
can be switched off (:class:`BuildSteps`), for an ablation or to inspect the model between steps.
What the recipe leaves to the device (``auto`` kernels, ``compile=auto``) is decided first, for the
recipe's device, and the steps and the reports see the decided values.
Loading itself checks that the 4-bit layers are exactly the planned ones; *verify* then measures
the loaded model against the 16-bit reference that planning kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlm.models import loading
from vlm.models.checkpointing import ActivationOffloader, enable_checkpointing
from vlm.models.compiling import compile_layers, kernels_inside_layers, resolve_compile
from vlm.models.families import ModelFamily
from vlm.models.lora import LoraSettings, apply_lora
from vlm.patching import KernelSettings, PatchReport, apply_kernels
from vlm.quant.config import QuantConfig
from vlm.quant.fidelity import Fidelity
from vlm.quant.memory import stored_bytes

from .planning import Planning, check_loaded


@dataclass(frozen=True)
class ModelRecipe:
    """What to build: a checkpoint of a family, stored as ``quant`` says, with LoRA and kernels."""

    checkpoint: str
    family: ModelFamily
    quant: QuantConfig
    lora: LoraSettings
    kernels: KernelSettings = KernelSettings()  # auto switches are decided for ``device``
    checkpointing: str = "standard"  # none | standard | offload
    compile: str = "none"  # none | layers | auto (decided for ``device`` and ``sharded``)
    device: str = "cpu"
    attn_implementation: str | None = "sdpa"
    sharded: bool = False  # a strategy shards the weights over the ranks (FSDP): compile=auto compiles nothing


@dataclass(frozen=True)
class BuildSteps:
    """Which steps after loading run."""

    verify: bool = True
    lora: bool = True
    frozen_parts_forward_only: bool = True
    kernels: bool = True
    checkpointing: bool = True
    compile: bool = True


@dataclass(frozen=True)
class StepReport:
    step: str
    summary: str


@dataclass
class BuiltModel:
    """The model ready to train, and what each step did to it."""

    model: nn.Module
    reports: list[StepReport] = field(default_factory=list)
    stored_bytes: int = 0  # weights, buffers and quantization state as loaded (before LoRA)
    loaded_fidelity: Fidelity | None = None  # against the 16-bit reference, where planning kept one
    patches: PatchReport = field(default_factory=PatchReport)
    offloader: ActivationOffloader | None = None  # under checkpointing=offload: what it moved
    kernels: KernelSettings = KernelSettings()  # the recipe's, resolved for its device
    compile: str = "none"  # none | layers: what the compile step did (compile=auto decided)

    def summary(self) -> str:
        return "; ".join(f"{r.step}: {r.summary}" for r in self.reports)


def build_model(recipe: ModelRecipe, planning: Planning, steps: BuildSteps = BuildSteps()) -> BuiltModel:
    """The model of ``recipe``, quantized as ``planning`` planned, through the steps switched on."""
    kernels = recipe.kernels.resolved(recipe.device)
    patched = kernels.enabled() if steps.kernels else []
    clashing = kernels_inside_layers(patched) if recipe.compile == "layers" else []
    if clashing and steps.compile:
        raise ValueError(f"model.compile=layers does not take the kernels patched inside the layers: {', '.join(clashing)}")
    compiling = resolve_compile(recipe.compile, recipe.device, patched, recipe.sharded)
    model, loaded = load(recipe, planning)
    built = BuiltModel(model, [loaded], stored_bytes=stored_bytes(model), kernels=kernels)
    if steps.verify:
        built.loaded_fidelity = check_loaded(planning, model, recipe.device)
        built.reports.append(_verified(built.loaded_fidelity))
    if steps.lora:
        built.model = apply_lora(built.model, recipe.family, recipe.lora)
        trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
        built.reports.append(StepReport("lora", f"r {recipe.lora.r}, {trainable:,} trainable parameters"))
    if steps.frozen_parts_forward_only:
        built.reports.append(run_frozen_parts_forward_only(built.model, recipe.family))
    if steps.kernels:
        built.patches = apply_kernels(built.model, kernels)
        decided = recipe.kernels.auto_summary(recipe.device)
        built.reports.append(StepReport("kernels", built.patches.summary() + (f"; {decided}" if decided else "")))
    if steps.checkpointing and recipe.checkpointing != "none":
        built.offloader = enable_checkpointing(built.model, recipe.checkpointing)
        summary = "activations recomputed in backward"
        if built.offloader is not None:
            summary += ", the layer inputs kept for it in pinned host memory"
        built.reports.append(StepReport("checkpointing", summary))
    if steps.compile and compiling.mode == "layers":
        compiled = compile_layers(built.model, built.offloader).summary()
        built.compile = "layers"
        summary = compiled if recipe.compile == "layers" else f"{compiling.summary()}: {compiled}"
        built.reports.append(StepReport("compile", summary))
    elif steps.compile and recipe.compile == "auto":
        built.reports.append(StepReport("compile", compiling.summary()))
    return built


def run_frozen_parts_forward_only(model: nn.Module, family: ModelFamily) -> StepReport:
    """The vision tower and projector run without autograd where neither holds a trainable weight.

    Their output then carries no graph: the backward pass stops at the boundary instead of running
    through a tower that has nothing to learn, and nothing of it is saved or recomputed. (Hugging
    Face makes the embeddings' outputs require grad for checkpointing, which otherwise pulls the
    whole tower into the backward.) A part with LoRA weights of its own is left as it is.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts = [name for name in (family.vision_tower, family.projector) if _has_submodule(base, name)]
    trainable = [name for name in parts if any(p.requires_grad for p in base.get_submodule(name).parameters())]
    if trainable:
        return StepReport("frozen parts", f"left in the backward: {', '.join(trainable)} hold trainable weights")
    # The projector may sit inside the tower (Qwen's merger): wrapping the outermost is enough.
    outermost = [n for n in parts if not any(n != other and n.startswith(other + ".") for other in parts)]
    for name in outermost:
        _forward_without_autograd(base.get_submodule(name))
    summary = f"{', '.join(outermost)} run forward only"
    if family.vision_tower in parts:
        trimmed = family.keep_only_used_tower_states(base.get_submodule(family.vision_tower))
        summary += f", {family.vision_tower} {trimmed}" if trimmed else ""
    return StepReport("frozen parts", summary)


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _forward_without_autograd(module: nn.Module) -> None:
    forward = module.forward

    def without_autograd(*args, **kwargs):  # noqa: ANN002, ANN003
        with torch.no_grad():
            return forward(*args, **kwargs)

    module.forward = without_autograd


def load(recipe: ModelRecipe, planning: Planning) -> tuple[nn.Module, StepReport]:
    model, report = loading.load_model(
        recipe.checkpoint,
        recipe.family,
        recipe.quant,
        quant_plan=planning.plan,
        device=recipe.device,
        attn_implementation=recipe.attn_implementation,
    )
    return model, StepReport("load", report.summary())


def _verified(loaded: Fidelity | None) -> StepReport:
    if loaded is None:
        return StepReport("verify", "4-bit layers as planned; no 16-bit reference to compare with")
    return StepReport("verify", f"KL {loaded.kl:.3g} nats/token against 16-bit, top-1 agreement {loaded.top1_agreement:.1%}")
