"""A training run's parts, typed: what it was asked to do (:class:`RunPlan`), the facts of how it
was built that ``metrics.json`` records (:class:`RunFacts`), and the objects ``Trainer.fit`` takes
(:class:`RunParts`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing them (PEFT, bitsandbytes) is left to the steps that use them
    import lightning

    from vlm.models.families import ModelFamily
    from vlm.models.lora import LoraSettings
    from vlm.models.spec import ModelSpec
    from vlm.patching import KernelSettings
    from vlm.quant.calibrate import CalibrationSettings
    from vlm.quant.config import QuantConfig
    from vlm.sweeps.jobs import JobIdentity

    from .model import BuiltModel, ModelRecipe
    from .planning import Planning


@dataclass(frozen=True)
class RunPlan:
    """What a training run is asked to do, validated before anything loads."""

    spec: ModelSpec
    family: ModelFamily
    quant: QuantConfig
    lora: LoraSettings
    kernels: KernelSettings
    calibration: CalibrationSettings
    identity: JobIdentity
    output_dir: Path
    seed: int
    max_seq_length: int

    def model_recipe(
        self, checkpoint: str, device: str, quant: QuantConfig | None = None, sharded: bool = False
    ) -> ModelRecipe:
        """What :func:`~vlm.build.model.build_model` builds for this plan from ``checkpoint`` on
        ``device``; ``quant`` replaces the plan's (as a strategy that shards the weights needs it);
        ``sharded``: that strategy runs (what ``auto`` settings are decided for, with ``device``)."""
        from .model import ModelRecipe

        return ModelRecipe(
            checkpoint=checkpoint,
            family=self.family,
            quant=self.quant if quant is None else quant,
            lora=self.lora,
            kernels=self.kernels,
            checkpointing=self.spec.checkpointing,
            compile=self.spec.compile,
            device=device,
            attn_implementation=self.spec.attn_implementation,
            sharded=sharded,
        )


# RunFacts fields that say what the trainable weights depend on, and those that describe the run.
BUILD_FIELDS = ("family", "checkpoint", "quant_method", "quant_policy", "kept_in_16bit", "lora_r", "lora_alpha", "lora_targets")
RUN_FIELDS = ("weight_bytes", "quant_fidelity", "kernels", "checkpointing", "compile", "max_seq_length", "resumed_from")


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class RunFacts:
    """How a run was built, as ``metrics.json`` records it beside what training measured."""

    family: str
    checkpoint: str
    quant_policy: str
    quant_method: str
    kept_in_16bit: tuple[str, ...]
    weight_bytes: int
    quant_fidelity: dict[str, dict[str, float | int]]
    lora_r: int
    lora_alpha: int
    lora_targets: str | list[str]
    kernels: dict[str, int]  # kernel → places it was patched into (auto switches as the device decided)
    checkpointing: str  # none | standard | offload
    compile: str  # none | layers: what ran (model.compile=auto as the device decided)
    max_seq_length: int
    identity: JobIdentity
    resumed_from: str | None = None  # the checkpoint this run continued

    @classmethod
    def of(
        cls, plan: RunPlan, checkpoint: str, planning: Planning, built: BuiltModel, resumed_from: str | None = None
    ) -> RunFacts:
        fidelity = dict(planning.report.fidelity)
        if built.loaded_fidelity is not None:
            fidelity["loaded"] = built.loaded_fidelity
        return cls(
            family=plan.family.model_type,
            checkpoint=checkpoint,
            quant_policy=str(plan.quant.policy),
            quant_method=plan.quant.method,
            kept_in_16bit=planning.plan.kept,
            weight_bytes=built.stored_bytes,
            quant_fidelity={label: score.as_dict() for label, score in fidelity.items()},
            lora_r=plan.lora.r,
            lora_alpha=plan.lora.alpha,
            lora_targets=plan.lora.target_modules if isinstance(plan.lora.target_modules, str) else list(plan.lora.target_modules),
            kernels=dict(built.patches.patched),
            checkpointing=plan.spec.checkpointing,
            compile=built.compile,
            max_seq_length=plan.max_seq_length,
            identity=plan.identity,
            resumed_from=resumed_from,
        )

    def compatibility(self) -> dict[str, Any]:
        """What the trainable weights depend on: a checkpoint resumes only into a run where these are equal."""
        return {name: _listed(getattr(self, name)) for name in BUILD_FIELDS}

    def as_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` records: the build, its weight bytes, fidelity and kernels, and the job."""
        measured = {name: getattr(self, name) for name in RUN_FIELDS}
        return {**self.compatibility(), **measured, **self.identity.as_dict()}


@dataclass
class RunParts:
    """What ``Trainer.fit`` is handed, and the planning whose report the run publishes."""

    module: lightning.LightningModule
    datamodule: lightning.LightningDataModule
    callbacks: list[lightning.Callback]
    loggers: list[Any]
    planning: Planning
    summary: Any | None = None  # the callback among ``callbacks`` that writes metrics.json
