"""``vlm-quantize``: resolve a quantization policy to exact layers, calibrating where asked, and
report per-layer errors, the decisions, weight memory and fidelity against the 16-bit model.

    vlm-quantize model=tiny_mllama quant=dynamic
    vlm-quantize model=llama32_vision_11b quant=dynamic data=webdataset data.urls=... calibration.budget_bytes=700MB

Writes ``quant_report.json`` and ``quant_report.png`` to the run directory and prints the most
sensitive layers. ``vlm-train`` plans the same way (:mod:`vlm.build.planning`) before it loads
the model for training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vlm.build.tracking import finish_runs, publish_quant_report
from vlm.configs import config_dir, register_resolvers
from vlm.errors import ConfigError
from vlm.models.families import get_family
from vlm.models.loading import load_processor
from vlm.quant.report import QuantReport

from .console import quiet_libraries
from .wiring import (
    instantiate_checked,
    plan_for_run,
    prepare_demo_data,
    resolve_checkpoint,
    target_device,
    write_resolved_config,
)


def quantize(cfg: DictConfig) -> QuantReport:
    """Plan and report without training; returns the report (also written to the run directory)."""
    from hydra.utils import instantiate

    spec, quant = instantiate_checked(cfg.model), instantiate_checked(cfg.quant)
    calibration = instantiate_checked(cfg.calibration)
    family = get_family(spec.family)
    output_dir = Path(cfg.paths.output_dir)
    write_resolved_config(cfg, output_dir)
    prepare_demo_data(cfg)
    checkpoint = resolve_checkpoint(spec, family, cfg.seed)
    processor = load_processor(checkpoint, family)
    planning = plan_for_run(cfg, family, quant, calibration, checkpoint, processor, target_device(None))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    try:
        publish_quant_report(planning.report, output_dir, loggers, top=cfg.get("report_top_layers", 15))
    finally:
        finish_runs()
    return planning.report


def main() -> None:
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
