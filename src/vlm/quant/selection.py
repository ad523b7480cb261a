"""Choosing which layers to keep in 16-bit under a byte budget.

Keeping a layer removes its quantization noise and costs the bytes between its 16-bit and its
quantized storage. The greedy choice ranks layers by noise removed per extra byte; noise is
measured as power (the squared relative error, or the KL when end-to-end sensitivity was
measured), the quantity that adds up across independent layers.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .formats import weight_bytes
from .sensitivity import LayerError

SCORES = ("output", "weight", "kl")


@dataclass(frozen=True)
class Candidate:
    name: str
    extra_bytes: int  # 16-bit bytes minus quantized bytes
    noise: float | None  # None: not measured (e.g. never reached by calibration inputs)


def candidates(
    layers: Iterable[LayerError], score: str, method: str, double_quant: bool = True
) -> list[Candidate]:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; one of {', '.join(SCORES)}")
    result = []
    for layer in layers:
        extra = weight_bytes(layer.shape, "none") - weight_bytes(layer.shape, method, double_quant)
        value = {"output": layer.output_error, "weight": layer.weight_error, "kl": layer.kl}[score]
        noise = None if value is None else (value if score == "kl" else value**2)
        result.append(Candidate(layer.name, extra, noise))
    return result


def greedy_keep(pool: Sequence[Candidate], budget: int) -> list[str]:
    """Layers to keep, best noise per extra byte first, while their extra bytes fit in ``budget``.

    A layer that does not fit is passed over for cheaper ones after it. Ties break by name, so
    the choice is deterministic.
    """
    ranked = sorted(
        (c for c in pool if c.noise is not None and c.noise > 0 and c.extra_bytes > 0),
        key=lambda c: (-c.noise / c.extra_bytes, c.name),
    )
    return _fill(ranked, budget)


def random_keep(pool: Sequence[Candidate], budget: int, seed: int) -> list[str]:
    """A random choice of layers filling the same ``budget``: the baseline a calibration must beat."""
    shuffled = sorted((c for c in pool if c.extra_bytes > 0), key=lambda c: c.name)
    random.Random(seed).shuffle(shuffled)
    return _fill(shuffled, budget)


def _fill(ordered: Iterable[Candidate], budget: int) -> list[str]:
    kept, spent = [], 0
    for candidate in ordered:
        if spent + candidate.extra_bytes <= budget:
            kept.append(candidate.name)
            spent += candidate.extra_bytes
    return kept
