"""Skip-layer policies: which linear layers of a model stay in 16-bit, as exact module names.

A policy is resolved against the model's real module tree (built on the meta device, so no
weights load) before loading; after loading, the quantized set is verified against the plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vlm.models.families import ModelFamily

# Always kept in 16-bit: quantizing the output head costs much accuracy for little memory.
ALWAYS_SKIPPED = ("lm_head",)


def _standard(family: ModelFamily, name: str) -> bool:
    return False


def _vision_skip(family: ModelFamily, name: str) -> bool:
    return family.is_vision(name) or family.is_projector(name)


def _bridge_skip(family: ModelFamily, name: str) -> bool:
    return _vision_skip(family, name) or family.is_cross_attention_out(name)


POLICIES: dict[str, Callable[[ModelFamily, str], bool]] = {
    "nf4": _standard,
    "vision_skip": _vision_skip,
    "bridge_skip": _bridge_skip,
}


@dataclass(frozen=True)
class QuantPlan:
    """The exact split of a model's linear layers into quantized and kept-in-16-bit, by full name."""

    quantized: tuple[str, ...]
    kept: tuple[str, ...]


def plan(
    linear_names: Iterable[str], family: ModelFamily, policy: str, extra_skip: Iterable[str] = ()
) -> QuantPlan:
    """Split ``linear_names`` by ``policy`` (a key of :data:`POLICIES`) and the ``extra_skip`` regexes."""
    keep_rule = POLICIES[policy]
    patterns = [re.compile(p) for p in extra_skip]
    quantized, kept = [], []
    for name in linear_names:
        skip = (
            name.split(".")[-1] in ALWAYS_SKIPPED
            or keep_rule(family, name)
            or any(p.fullmatch(name) for p in patterns)
        )
        (kept if skip else quantized).append(name)
    return QuantPlan(quantized=tuple(quantized), kept=tuple(kept))
