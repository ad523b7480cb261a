"""``vlm-quantize``: resolve a quantization policy to exact layers, calibrating where asked, and
report per-layer errors, the decisions, weight memory and fidelity against the 16-bit model.

    vlm-quantize model=tiny_mllama quant=dynamic
    vlm-quantize model=llama32_vision_11b quant=dynamic data=webdataset data.urls=... calibration.budget_bytes=700MB

Writes ``quant_report.json`` and ``quant_report.png`` to the run directory and prints the most
sensitive layers. ``vlm-train`` plans the same way before it loads the model for training.
"""

from __future__ import annotations

import gc
import itertools
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from vlm.configs import config_dir, register_resolvers
from vlm.quant.calibrate import CalibrationSettings, measure
from vlm.quant.config import QuantConfig
from vlm.quant.fidelity import Fidelity, fidelity, reference_log_probs
from vlm.quant.memory import human_bytes, weight_memory
from vlm.quant.policies import PolicyError, QuantPlan, matching, plan
from vlm.quant.report import QuantReport
from vlm.quant.selection import Candidate, candidates, greedy_keep, random_keep
from vlm.quant.simulate import simulated_quantization

from .wiring import (
    ConfigError,
    build_components,
    build_datamodule,
    close_loggers,
    prepare_demo_data,
    resolve_checkpoint,
    target_device,
    wandb_runs,
    write_resolved_config,
)

log = logging.getLogger("vlm.quantize")

# Batch keys a vision-language model's forward does not take.
NOT_MODEL_INPUTS = frozenset({"labels", "skipped_samples"})
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class LogitsProbe:
    """Runs a Hugging Face model on a collated batch for its logits, and picks the positions that
    matter: those that predict a supervised token (``labels`` after the one-token shift)."""

    device: torch.device | str

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {
            key: value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
            if key not in NOT_MODEL_INPUTS
        }
        return model(**inputs, use_cache=False).logits

    @staticmethod
    def positions(batch: dict[str, Any]) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            return batch["attention_mask"].bool()
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
        return mask


def take_batches(loader: Iterable[dict[str, Any]], n: int, skip: int = 0) -> list[dict[str, Any]]:
    """Batches ``skip .. skip+n`` of ``loader`` (without the data module's skip counts)."""
    batches = []
    for batch in itertools.islice(loader, skip, skip + n):
        batch = dict(batch)
        batch.pop("skipped_samples", None)
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------- planning
@dataclass
class Planning:
    """A resolved plan with its report, and what checking the loaded model against 16-bit needs."""

    plan: QuantPlan
    report: QuantReport
    heldout: list[dict[str, Any]] = field(default_factory=list)
    reference: list[torch.Tensor] | None = None  # 16-bit log-probs on ``heldout``


def needs_measurement(quant: QuantConfig, calibration: CalibrationSettings) -> bool:
    """Whether planning loads the 16-bit model: to calibrate (``dynamic``) or to report errors."""
    return quant.quantizes and (quant.policy == "dynamic" or calibration.measure)


def plan_quantization(
    checkpoint: str,
    family: Any,
    quant: QuantConfig,
    calibration: CalibrationSettings,
    *,
    calibration_batches: list[dict[str, Any]] = (),
    heldout_batches: list[dict[str, Any]] = (),
    device: str = "cpu",
    attn_implementation: str | None = "sdpa",
    cache_dir: str | Path | None = None,
) -> Planning:
    """``quant``'s policy resolved to exact layers of ``checkpoint``, with its report.

    When measuring (see :func:`needs_measurement`), the 16-bit model is loaded once: every
    quantizable layer's errors are measured on ``calibration_batches`` (or read from the cache),
    ``dynamic`` chooses under its budget, and the plan's fidelity is evaluated on
    ``heldout_batches`` by simulating the quantization layer by layer.
    """
    from vlm.models.loading import linear_layer_names, load_config, load_model, model_skeleton

    config = load_config(checkpoint, family)
    skeleton = model_skeleton(family, config)
    names = linear_layer_names(skeleton)
    dtype_bytes = torch.finfo(quant.torch_compute_dtype).bits // 8
    try:
        all_4bit = plan(names, "standard", family.parts)
        forced = sorted(matching(names, quant.skip_modules))
    except PolicyError as error:
        raise ConfigError(str(error)) from None

    def report_for(quant_plan: QuantPlan, **extra: Any) -> QuantReport:
        memory = weight_memory(
            skeleton, quant_plan.quantized, all_4bit.quantized, quant.method, quant.double_quant, dtype_bytes
        )
        return QuantReport(
            model=str(checkpoint),
            method=quant.method,
            double_quant=quant.double_quant,
            policy=quant.policy,
            plan=quant_plan,
            parts=family.parts,
            memory=memory,
            **extra,
        )

    if not needs_measurement(quant, calibration):
        quant_plan = _resolve(names, family, quant)
        return Planning(quant_plan, report_for(quant_plan))
    if not calibration_batches:
        raise ConfigError("calibration needs at least one batch, and the calibration data gave none")
    device = calibration.device or device
    shortfall = _memory_shortfall(report_for(all_4bit).memory.all_16bit, device)
    if shortfall:
        if quant.policy == "dynamic":
            raise ConfigError(
                f"quant=dynamic calibrates on the 16-bit model, and {shortfall}; calibrate on the CPU with "
                "calibration.device=cpu (slow, needs the RAM), or on a larger GPU with vlm-quantize and "
                "choose those layers here with quant=explicit"
            )
        log.warning("not measuring per-layer errors (calibration.measure): %s", shortfall)
        quant_plan = _resolve(names, family, quant)
        return Planning(quant_plan, report_for(quant_plan))

    probe = LogitsProbe(device)
    sixteen_bit = QuantConfig(method="none", compute_dtype=quant.compute_dtype)
    model, _ = load_model(checkpoint, family, sixteen_bit, device=device, attn_implementation=attn_implementation)
    model.eval()
    try:
        measurement = measure(
            model,
            all_4bit.quantized,
            calibration_batches,
            probe.forward,
            probe.positions,
            method=quant.method,
            double_quant=quant.double_quant,
            settings=calibration,
            model_config=config.to_dict(),
            cache_dir=cache_dir,
        )
        pool = candidates(measurement.layers, calibration.score, quant.method, quant.double_quant)
        budget = None
        if quant.policy == "dynamic":
            budget = calibration.budget(report_for(all_4bit).memory.all_4bit)
        calibrated = _calibrated_keep(pool, forced, budget) if budget is not None else ()
        quant_plan = _resolve(names, family, quant, calibrated)
        plans = _plans_to_compare(quant_plan, all_4bit, pool, forced, budget, calibration.random_baselines)
        reference, scores = None, {}
        if heldout_batches:
            reference = reference_log_probs(model, heldout_batches, probe.forward, probe.positions)
            for label, quantized in plans.items():
                with simulated_quantization(model, quantized, quant.method, quant.double_quant):
                    scores[label] = fidelity(model, heldout_batches, probe.forward, probe.positions, reference)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    report = report_for(
        quant_plan,
        layers=measurement.layers,
        budget_bytes=budget,
        fidelity=scores,
        calibration={
            "batches": len(calibration_batches),
            "tokens": int(sum(int(b["attention_mask"].sum()) for b in calibration_batches)),
            "heldout_batches": len(heldout_batches),
            "score": calibration.score,
            "end_to_end": calibration.end_to_end,
            "cache_key": measurement.cache_key,
            "cache_hit": measurement.cache_hit,
            "seconds": round(measurement.seconds, 2),
            "fidelity_by": "simulated quantization of the 16-bit model, one layer at a time",
        },
    )
    return Planning(quant_plan, report, list(heldout_batches), reference)


def _calibrated_keep(pool: list[Candidate], forced: list[str], budget: int) -> list[str]:
    """``dynamic``'s choice: what ``quant.skip_modules`` forces comes out of the budget first."""
    spent = sum(c.extra_bytes for c in pool if c.name in forced)
    if spent > budget:
        log.warning("quant.skip_modules alone take %d bytes, over the %d-byte budget", spent, budget)
    return greedy_keep([c for c in pool if c.name not in forced], max(0, budget - spent))


def _plans_to_compare(
    quant_plan: QuantPlan, all_4bit: QuantPlan, pool: list[Candidate], forced: list[str], budget: int | None, randoms: int
) -> dict[str, tuple[str, ...]]:
    """Label → quantized layers: this plan, the all-4-bit recipe, and random choices under the same budget."""
    plans = {"policy": quant_plan.quantized}
    if set(all_4bit.quantized) != set(quant_plan.quantized):
        plans["all_4bit"] = all_4bit.quantized
    if budget is not None:
        free = [c for c in pool if c.name not in forced]
        left = max(0, budget - sum(c.extra_bytes for c in pool if c.name in forced))
        for seed in range(randoms):
            kept = set(random_keep(free, left, seed)) | set(forced)
            plans[f"random_same_budget_{seed}"] = tuple(n for n in all_4bit.quantized if n not in kept)
    return plans


def _memory_shortfall(sixteen_bit_bytes: int, device: str) -> str | None:
    """Why the 16-bit model will not fit on ``device`` (with a fifth more for activations), or None."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    needed = int(sixteen_bit_bytes * 1.2)
    if needed <= free:
        return None
    return f"it needs about {human_bytes(needed)} on {device}, which has {human_bytes(free)} free"


def check_loaded(planning: Planning, model: nn.Module, device: str) -> Fidelity | None:
    """Fidelity of the model as actually loaded (bitsandbytes layers), against the 16-bit reference."""
    if planning.reference is None:
        return None
    probe = LogitsProbe(device)
    was_training = model.training
    model.eval()
    try:
        return fidelity(model, planning.heldout, probe.forward, probe.positions, planning.reference)
    finally:
        model.train(was_training)


def _resolve(names: list[str], family: Any, quant: QuantConfig, calibrated: Iterable[str] = ()) -> QuantPlan:
    if not quant.quantizes:
        return QuantPlan.unquantized(names)
    try:
        return plan(names, quant.policy, family.parts, quant.skip_modules, calibrated)
    except PolicyError as error:
        raise ConfigError(str(error)) from None


# --------------------------------------------------------------------------- reporting
def publish(report: QuantReport, output_dir: Path, loggers: list[Any], top: int = 15) -> Path:
    """Write the report files, print the table, and log both to W&B when it is on."""
    json_path, png_path = report.write(output_dir)
    report.print(top=top)
    for run in wandb_runs(loggers):
        import wandb

        rows = report.layer_rows()
        columns = list(rows[0]) if rows else []
        payload: dict[str, Any] = {"quant/layers": wandb.Table(columns=columns, data=[[_cell(r[c]) for c in columns] for r in rows])}
        payload["quant/report"] = wandb.Image(str(png_path))
        run.log(payload)
        run.summary.update(_flat_summary(report))
        run.save(str(json_path), base_path=str(json_path.parent), policy="now")
    return json_path


def _cell(value: Any) -> Any:
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def _flat_summary(report: QuantReport) -> dict[str, Any]:
    summary = {f"quant/memory/{key}": value for key, value in report.to_dict()["memory"].items()}
    for label, score in report.fidelity.items():
        summary[f"quant/fidelity/{label}/kl"] = score.kl
        summary[f"quant/fidelity/{label}/top1_agreement"] = score.top1_agreement
    summary["quant/kept_in_16bit"] = len(report.plan.kept)
    return summary


# --------------------------------------------------------------------------- entry point
def gather_batches(
    cfg: DictConfig, calibration: CalibrationSettings, processor: Any, family: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Calibration batches from the training shards (or ``calibration.urls``), held-out batches
    from the validation shards (or, without them, the training batches that follow)."""
    overrides = {"urls": calibration.urls} if calibration.urls else {}
    datamodule = build_datamodule(cfg.data, processor, family, **overrides)
    stream = datamodule.stream_dataloader(datamodule.urls)
    calibration_batches = take_batches(stream, calibration.batches)
    if not calibration.fidelity_batches:
        return calibration_batches, []
    if datamodule.val_urls is not None:
        heldout = take_batches(datamodule.stream_dataloader(datamodule.val_urls), calibration.fidelity_batches)
    else:
        heldout = take_batches(
            datamodule.stream_dataloader(datamodule.urls), calibration.fidelity_batches, skip=calibration.batches
        )
    return calibration_batches, heldout


def plan_for_run(
    cfg: DictConfig, spec: Any, family: Any, quant: QuantConfig, checkpoint: str, processor: Any, device: str
) -> Planning:
    """Planning as both entry points run it: config in, batches gathered only when measuring."""
    calibration = build_components(cfg, ("calibration",))["calibration"]
    batches: tuple[list, list] = ([], [])
    if needs_measurement(quant, calibration):
        batches = gather_batches(cfg, calibration, processor, family)
    return plan_quantization(
        checkpoint,
        family,
        quant,
        calibration,
        calibration_batches=batches[0],
        heldout_batches=batches[1],
        device=device,
        attn_implementation=spec.attn_implementation,
        cache_dir=Path(cfg.paths.cache_dir) / "calibration",
    )


def quantize(cfg: DictConfig) -> QuantReport:
    """Plan and report without training; returns the report (also written to the run directory)."""
    from hydra.utils import instantiate

    from vlm.models.families import get_family
    from vlm.models.loading import load_processor

    parts = build_components(cfg, ("model", "quant"))
    spec, quant = parts["model"], parts["quant"]
    family = get_family(spec.family)
    output_dir = Path(cfg.paths.output_dir)
    write_resolved_config(cfg, output_dir)
    prepare_demo_data(cfg)
    checkpoint = resolve_checkpoint(spec, family, cfg.seed)
    processor = load_processor(checkpoint, family)
    planning = plan_for_run(cfg, spec, family, quant, checkpoint, processor, target_device(None))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    try:
        publish(planning.report, output_dir, loggers, top=cfg.get("report_top_layers", 15))
    finally:
        close_loggers(loggers)
    return planning.report


def main() -> None:
    from .console import quiet_libraries

    quiet_libraries()
    register_resolvers()

    @hydra.main(config_path=str(config_dir()), config_name="quantize", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        try:
            quantize(cfg)
        except ConfigError as error:
            print(f"vlm-quantize: invalid config: {error}", file=sys.stderr)
            sys.exit(2)

    _run()


if __name__ == "__main__":
    main()
