"""Calibration: measure every linear layer's sensitivity once, cache it, choose under a budget.

Measurements are cached as JSON keyed by the model (its config and a sample of every linear
weight) and the calibration data (a hash of the batches), so a sweep over budgets, LoRA ranks
or learning rates calibrates once. The choice itself is cheap and made fresh from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .fidelity import Batch, Forward, Positions
from .selection import SCORES
from .sensitivity import LayerError, measure_end_to_end, measure_layers

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is measured, or how, changes
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


@dataclass(frozen=True)
class CalibrationSettings:
    """How layers are measured before loading, and how the ``dynamic`` policy chooses.

    ``budget_bytes`` (an integer or a string such as ``"700MB"`` or ``"0.7GiB"``) wins over
    ``budget_fraction`` (extra 16-bit bytes as a fraction of the all-4-bit weight memory).
    With ``score="kl"`` only the ``end_to_end_layers`` layers that got a KL measurement (those
    with the largest output error) are candidates.
    """

    measure: bool = True
    device: str | None = None  # where the 16-bit model is measured; None: where the model will train
    batches: int = 4
    urls: str | None = None
    fidelity_batches: int = 2
    budget_fraction: float = 0.10
    budget_bytes: int | str | None = None
    score: str = "output"
    end_to_end: bool = False
    end_to_end_layers: int | None = 64
    random_baselines: int = 3
    cache: bool = True

    def __post_init__(self) -> None:
        if self.batches < 1:
            raise ValueError(f"calibration.batches={self.batches} must be at least 1")
        if self.fidelity_batches < 0:
            raise ValueError(f"calibration.fidelity_batches={self.fidelity_batches} must be 0 or more")
        if not 0 <= self.budget_fraction <= 10:
            raise ValueError(f"calibration.budget_fraction={self.budget_fraction} must be between 0 and 10")
        if self.budget_bytes is not None:
            parse_bytes(self.budget_bytes)  # raises on a malformed size
        if self.score not in SCORES:
            raise ValueError(f"calibration.score={self.score!r} is not one of {', '.join(SCORES)}")
        if self.score == "kl" and not self.end_to_end:
            raise ValueError("calibration.score=kl needs calibration.end_to_end=true")
        if self.end_to_end_layers is not None and self.end_to_end_layers < 1:
            raise ValueError(f"calibration.end_to_end_layers={self.end_to_end_layers} must be at least 1 or null")
        if self.random_baselines < 0:
            raise ValueError(f"calibration.random_baselines={self.random_baselines} must be 0 or more")

    def budget(self, all_4bit_bytes: int) -> int:
        """Extra bytes the ``dynamic`` policy may spend on 16-bit layers."""
        if self.budget_bytes is not None:
            return parse_bytes(self.budget_bytes)
        return int(self.budget_fraction * all_4bit_bytes)


def parse_bytes(value: int | float | str) -> int:
    """``700MB``, ``0.7GiB``, ``123456`` → bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"calibration.budget_bytes={value} must not be negative")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS | {"": 1}:
        raise ValueError(
            f"calibration.budget_bytes={value!r} is not a size; write e.g. 700000000, '700MB' or '0.7GiB'"
        )
    return int(float(match.group(1)) * _UNITS.get(unit, 1))


# --------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module, names: Sequence[str], config: dict | None = None) -> str:
    """A hash of the config and of a sample of every linear weight (a few thousand values each)."""
    digest = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        flat = weight.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def batches_fingerprint(batches: Sequence[Batch]) -> str:
    """A hash of every tensor (and plain value) of the calibration batches."""
    digest = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(str((value.dtype, tuple(value.shape))).encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    for batch in batches:
        feed(batch)
    return digest.hexdigest()


# --------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Measurement:
    layers: list[LayerError]
    cache_key: str
    cache_hit: bool
    seconds: float


def measure(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Batch],
    forward: Forward,
    positions: Positions,
    *,
    method: str,
    double_quant: bool,
    settings: CalibrationSettings,
    model_config: dict | None = None,
    cache_dir: str | Path | None = None,
) -> Measurement:
    """Every layer's errors on ``batches``, from the cache when this model and data were measured before."""
    started = time.perf_counter()
    key = hashlib.sha256(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "model": model_fingerprint(model, names, model_config),
                "data": batches_fingerprint(batches),
                "method": method,
                "double_quant": double_quant,
                "end_to_end": settings.end_to_end,
                "end_to_end_layers": settings.end_to_end_layers,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.json" if cache_dir and settings.cache else None
    if path is not None and path.exists():
        layers = [LayerError.from_dict(d) for d in json.loads(path.read_text())["layers"]]
        log.info("calibration: reusing %s", path)
        return Measurement(layers, key, True, time.perf_counter() - started)

    layers = measure_layers(model, names, batches, forward, method, double_quant)
    if settings.end_to_end:
        reached = [layer for layer in layers if layer.output_error is not None]
        reached.sort(key=lambda layer: (-layer.output_error, layer.name))
        chosen = reached[: settings.end_to_end_layers] if settings.end_to_end_layers else reached
        measure_end_to_end(model, chosen, batches, forward, positions, method, double_quant)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "layers": [layer.as_dict() for layer in layers]}, indent=1))
        tmp.replace(path)
    return Measurement(layers, key, False, time.perf_counter() - started)
