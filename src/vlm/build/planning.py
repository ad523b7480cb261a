"""The quantization plan of a run: which linear layers stay in 16-bit, and the report that says why.

Two entries. :func:`plan_model` works on any ``nn.Module`` tree held in 16-bit (a vision-language
model, a text transformer, a toy of linear layers): it measures every linear layer's quantization
error on real batches, lets ``dynamic`` choose under its byte budget, and compares the fidelity of
this plan with the all-4-bit recipe and with random choices under the same budget.
:func:`plan_checkpoint` does the same for a checkpoint of a model family, loading its 16-bit
model only when something is to be measured, and otherwise resolving the policy on a weightless
skeleton.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.data.encoding import IGNORE_INDEX
from vlm.errors import ConfigError
from vlm.models.families import ModelFamily
from vlm.quant.calibrate import CalibrationSettings, measure
from vlm.quant.config import QuantConfig
from vlm.quant.fidelity import Batch, Fidelity, fidelity, reference_log_probs
from vlm.quant.memory import WeightMemory, human_bytes, weight_memory
from vlm.quant.policies import (
    ModelParts,
    Policy,
    QuantPlan,
    linear_layer_names,
    matching,
    plan,
)
from vlm.quant.report import QuantReport
from vlm.quant.selection import Candidate, candidates, greedy_keep, random_keep
from vlm.quant.simulate import simulated_quantization

log = logging.getLogger(__name__)

# Batch keys a vision-language model's forward does not take.
NOT_MODEL_INPUTS = frozenset({"labels", "skipped_samples"})


# --------------------------------------------------------------------------- how a model is probed
@dataclass(frozen=True)
class Probe:
    """How calibration runs a model: ``forward(model, batch)`` gives logits ``[..., vocab]``, and
    ``positions(batch)`` a boolean mask of the positions whose predictions count."""

    forward: Callable[[nn.Module, Batch], torch.Tensor]
    positions: Callable[[Batch], torch.Tensor]


def causal_lm_probe(device: torch.device | str) -> Probe:
    """A Hugging Face causal LM on collated batches: the positions that predict a supervised token
    (``labels`` after the one-token shift), or every attended position where there are no labels."""

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {
            key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
            if key not in NOT_MODEL_INPUTS
        }
        return model(**inputs, use_cache=False).logits

    def positions(batch: Batch) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            return batch["attention_mask"].bool()
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
        return mask

    return Probe(forward, positions)


def take_batches(loader: Iterable[Batch], n: int, skip: int = 0) -> list[Batch]:
    """Batches ``skip .. skip+n`` of ``loader``, without the data module's skip counts."""
    batches = []
    for batch in itertools.islice(loader, skip, skip + n):
        batch = dict(batch)
        batch.pop("skipped_samples", None)
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------- the plan
@dataclass
class Planning:
    """A resolved plan with its report, and what checking the loaded model against 16-bit needs."""

    plan: QuantPlan
    report: QuantReport
    heldout: list[Batch] = field(default_factory=list)
    reference: list[torch.Tensor] | None = None  # 16-bit log-probs on ``heldout``


def needs_measurement(quant: QuantConfig, calibration: CalibrationSettings) -> bool:
    """Whether planning runs the 16-bit model: to calibrate (``dynamic``) or to report errors."""
    return quant.quantizes and (quant.calibrates or calibration.measure)


@dataclass(frozen=True)
class Budget:
    """What ``dynamic`` may still spend once the layers ``quant.skip_modules`` forces are paid for."""

    free: list[Candidate]  # the candidates not forced
    forced: list[str]
    left: int  # bytes

    @classmethod
    def split(cls, pool: Sequence[Candidate], forced: Sequence[str], budget: int) -> Budget:
        spent = sum(c.extra_bytes for c in pool if c.name in forced)
        if spent > budget:
            log.warning("quant.skip_modules alone take %d bytes, over the %d-byte budget", spent, budget)
        return cls([c for c in pool if c.name not in forced], list(forced), max(0, budget - spent))

    def calibrated(self) -> list[str]:
        """The calibrated choice: best noise removed per extra byte first."""
        return greedy_keep(self.free, self.left)

    def random(self, seed: int) -> set[str]:
        """A random choice under the same budget, the forced layers included: the baseline to beat."""
        return set(random_keep(self.free, self.left, seed)) | set(self.forced)


def plan_model(
    model: nn.Module,
    quant: QuantConfig,
    calibration: CalibrationSettings,
    *,
    batches: Sequence[Batch],
    probe: Probe,
    heldout: Sequence[Batch] = (),
    parts: ModelParts = ModelParts(),
    label: str = "model",
    model_config: dict | None = None,
    cache_dir: str | Path | None = None,
) -> Planning:
    """The plan of ``model``, a 16-bit ``nn.Module`` of any kind, measured on ``batches``.

    Every linear layer's weight and output errors are measured (or read from ``cache_dir``);
    ``dynamic`` keeps the layers with the most noise removed per extra byte until its budget is
    spent; with ``heldout`` batches, the fidelity of this plan, of the all-4-bit recipe and of
    random choices under the same budget is measured by simulating each plan's quantization.
    ``parts`` says where a model's vision tower and projector are, for the part-based policies;
    ``label`` names the model in the report.
    """
    if not batches:
        raise ConfigError("calibration needs at least one batch, and the calibration data gave none")
    names = linear_layer_names(model)
    all_4bit = plan(names, Policy.STANDARD, parts)
    forced = sorted(_forced(names, quant))
    measurement = measure(
        model,
        all_4bit.quantized,
        batches,
        probe.forward,
        probe.positions,
        method=quant.method,
        double_quant=quant.double_quant,
        settings=calibration,
        model_config=model_config,
        cache_dir=cache_dir,
    )
    pool = candidates(measurement.layers, calibration.score, quant.method, quant.double_quant)
    budget = calibration.budget(_memory(model, quant, all_4bit, all_4bit).all_4bit) if quant.calibrates else None
    spending = Budget.split(pool, forced, budget) if budget is not None else None
    quant_plan = quant.resolve(names, parts, spending.calibrated() if spending else ())

    reference, scores = None, {}
    if heldout:
        reference = reference_log_probs(model, heldout, probe.forward, probe.positions)
        for plan_label, quantized in _plans_to_compare(quant_plan, all_4bit, spending, calibration.random_baselines).items():
            with simulated_quantization(model, quantized, quant.method, quant.double_quant):
                scores[plan_label] = fidelity(model, heldout, probe.forward, probe.positions, reference)
    report = _report(
        model,
        quant,
        parts,
        quant_plan,
        all_4bit,
        label,
        layers=measurement.layers,
        budget_bytes=budget,
        fidelity=scores,
        calibration={
            "batches": len(batches),
            "tokens": sum(_tokens(b, probe) for b in batches),
            "heldout_batches": len(heldout),
            "score": calibration.score,
            "end_to_end": calibration.end_to_end,
            "cache_key": measurement.cache_key,
            "cache_hit": measurement.cache_hit,
            "seconds": round(measurement.seconds, 2),
            "fidelity_by": "simulated quantization of the 16-bit model, one layer at a time",
        },
    )
    return Planning(quant_plan, report, list(heldout), reference)


def plan_checkpoint(
    checkpoint: str,
    family: ModelFamily,
    quant: QuantConfig,
    calibration: CalibrationSettings,
    *,
    calibration_batches: Sequence[Batch] = (),
    heldout_batches: Sequence[Batch] = (),
    device: str = "cpu",
    attn_implementation: str | None = "sdpa",
    cache_dir: str | Path | None = None,
) -> Planning:
    """``quant``'s policy resolved to exact layers of ``checkpoint``, with its report.

    When measuring (see :func:`needs_measurement`) the 16-bit model is loaded once onto
    ``calibration.device`` (default ``device``) and planned by :func:`plan_model`; otherwise the
    policy is resolved on a weightless skeleton. Raises ``ConfigError`` when ``dynamic`` would
    need more memory than the device has free.
    """
    from vlm.models.loading import load_config, load_model, model_skeleton

    config = load_config(checkpoint, family)
    skeleton = model_skeleton(family, config)
    names = linear_layer_names(skeleton)
    all_4bit = plan(names, Policy.STANDARD, family.parts)

    def unmeasured() -> Planning:
        quant_plan = quant.resolve(names, family.parts)
        return Planning(quant_plan, _report(skeleton, quant, family.parts, quant_plan, all_4bit, checkpoint))

    _forced(names, quant)  # a bad quant.skip_modules fails here, before any weight loads
    if not needs_measurement(quant, calibration):
        return unmeasured()
    if not calibration_batches:
        raise ConfigError("calibration needs at least one batch, and the calibration data gave none")
    device = calibration.device or device
    shortfall = memory_shortfall(_memory(skeleton, quant, all_4bit, all_4bit).all_16bit, device)
    if shortfall:
        if quant.calibrates:
            raise ConfigError(
                f"quant=dynamic calibrates on the 16-bit model, and {shortfall}; calibrate on the CPU with "
                "calibration.device=cpu (slow, needs the RAM), or on a larger GPU with vlm-quantize and "
                "choose those layers here with quant=explicit"
            )
        log.warning("not measuring per-layer errors (calibration.measure): %s", shortfall)
        return unmeasured()

    sixteen_bit = QuantConfig(method="none", compute_dtype=quant.compute_dtype)
    model, _ = load_model(checkpoint, family, sixteen_bit, device=device, attn_implementation=attn_implementation)
    model.eval()
    try:
        return plan_model(
            model,
            quant,
            calibration,
            batches=calibration_batches,
            heldout=heldout_batches,
            probe=causal_lm_probe(device),
            parts=family.parts,
            label=str(checkpoint),
            model_config=config.to_dict(),
            cache_dir=cache_dir,
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_loaded(planning: Planning, model: nn.Module, device: str) -> Fidelity | None:
    """Fidelity of the model as actually loaded (bitsandbytes layers) against the 16-bit reference,
    where planning kept one; ``None`` otherwise."""
    if planning.reference is None:
        return None
    probe = causal_lm_probe(device)
    was_training = model.training
    model.eval()
    try:
        return fidelity(model, planning.heldout, probe.forward, probe.positions, planning.reference)
    finally:
        model.train(was_training)


def memory_shortfall(sixteen_bit_bytes: int, device: str) -> str | None:
    """Why the 16-bit model will not fit on ``device`` (with a fifth more for activations), or None."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    needed = int(sixteen_bit_bytes * 1.2)
    if needed <= free:
        return None
    return f"it needs about {human_bytes(needed)} on {device}, which has {human_bytes(free)} free"


# --------------------------------------------------------------------------- helpers
def _forced(names: Sequence[str], quant: QuantConfig) -> set[str]:
    """The layers ``quant.skip_modules`` keeps; a ``PolicyError`` for a pattern that matches none."""
    return matching(names, quant.skip_modules)


def _plans_to_compare(
    quant_plan: QuantPlan, all_4bit: QuantPlan, spending: Budget | None, randoms: int
) -> dict[str, tuple[str, ...]]:
    """Label → quantized layers: this plan, the all-4-bit recipe, and random choices under the same budget."""
    plans = {"policy": quant_plan.quantized}
    if set(all_4bit.quantized) != set(quant_plan.quantized):
        plans["all_4bit"] = all_4bit.quantized
    if spending is not None:
        for seed in range(randoms):
            kept = spending.random(seed)
            plans[f"random_same_budget_{seed}"] = tuple(n for n in all_4bit.quantized if n not in kept)
    return plans


def _tokens(batch: Batch, probe: Probe) -> int:
    """Tokens of a batch: the attended ones where it has a mask, else the positions that count."""
    mask = batch.get("attention_mask")
    return int((mask if mask is not None else probe.positions(batch)).sum())


def _memory(tree: nn.Module, quant: QuantConfig, quant_plan: QuantPlan, all_4bit: QuantPlan) -> WeightMemory:
    dtype_bytes = torch.finfo(quant.torch_compute_dtype).bits // 8
    return weight_memory(tree, quant_plan.quantized, all_4bit.quantized, quant.method, quant.double_quant, dtype_bytes)


def _report(
    tree: nn.Module,
    quant: QuantConfig,
    parts: ModelParts,
    quant_plan: QuantPlan,
    all_4bit: QuantPlan,
    label: str,
    **extra: Any,
) -> QuantReport:
    return QuantReport(
        model=label,
        method=quant.method,
        double_quant=quant.double_quant,
        policy=quant.policy,
        plan=quant_plan,
        parts=parts,
        memory=_memory(tree, quant, quant_plan, all_4bit),
        **extra,
    )


__all__ = [
    "Budget",
    "Planning",
    "Probe",
    "causal_lm_probe",
    "check_loaded",
    "memory_shortfall",
    "needs_measurement",
    "plan_checkpoint",
    "plan_model",
    "take_batches",
]
