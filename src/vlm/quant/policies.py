"""Skip-layer policies: which linear layers stay in 16-bit, resolved to exact module names.

A policy is resolved against the model's real list of linear layers (from a weightless
skeleton) before anything loads; after loading, the quantized set is checked against the plan.
This module knows no model family: a family describes where its sensitive parts live as a
:class:`ModelParts`, and every rule here works on full module names only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from torch import nn

from vlm.errors import ConfigError

# Always kept in 16-bit: quantizing the output head costs much accuracy for little memory.
ALWAYS_KEPT = ("lm_head",)


class Policy(str, Enum):
    """Which linear layers stay in 16-bit. A ``str``, so a config value compares and serializes as itself."""

    STANDARD = "standard"  # lm_head only: the standard QLoRA recipe
    VISION_SKIP = "vision_skip"
    BRIDGE_SKIP = "bridge_skip"
    DYNAMIC = "dynamic"  # chosen by calibration under a memory budget
    EXPLICIT = "explicit"  # quant.skip_modules only

    def __str__(self) -> str:
        return self.value


# Which parts a policy keeps in 16-bit. ``dynamic`` and ``explicit`` choose by name instead.
PART_POLICIES: dict[Policy, tuple[str, ...]] = {
    Policy.STANDARD: (),
    Policy.VISION_SKIP: ("vision", "projector"),
    Policy.BRIDGE_SKIP: ("vision", "projector", "cross_attention_out"),
}
POLICIES = tuple(policy.value for policy in Policy)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` of ``model`` (bitsandbytes' layers are ``nn.Linear`` too)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


class PolicyError(ConfigError):
    """A policy cannot be resolved against this model (e.g. a regex that matches no layer)."""


@dataclass(frozen=True)
class ModelParts:
    """Where a model keeps the parts that 4-bit quantization hurts most.

    ``vision`` and ``projector`` are module-name prefixes; ``cross_attention_out`` is a regex
    full-matched against module names (``None`` for models without cross-attention).
    """

    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    cross_attention_out: str | None = None

    def part_of(self, name: str) -> str:
        """``vision``, ``projector``, ``cross_attention_out`` or ``language`` (everything else)."""
        # The projector first: some families nest it inside the vision tower's module.
        if any(_under(name, prefix) for prefix in self.projector):
            return "projector"
        if self.cross_attention_out and re.fullmatch(self.cross_attention_out, name):
            return "cross_attention_out"
        if any(_under(name, prefix) for prefix in self.vision):
            return "vision"
        return "language"


@dataclass(frozen=True)
class QuantPlan:
    """The exact split of a model's linear layers into quantized and kept-in-16-bit, by full name."""

    quantized: tuple[str, ...]
    kept: tuple[str, ...]

    @classmethod
    def unquantized(cls, linear_names: Iterable[str]) -> QuantPlan:
        return cls(quantized=(), kept=tuple(linear_names))


def always_kept(name: str) -> bool:
    return name.split(".")[-1] in ALWAYS_KEPT


def matching(linear_names: Sequence[str], patterns: Iterable[str]) -> set[str]:
    """Names full-matched by any of ``patterns``; a pattern that matches no layer is an error.

    Full matches on full names, so that ``vision_model`` alone is refused instead of silently
    keeping nothing (the mistake that short names invite).
    """
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise PolicyError(f"quant.skip_modules: {pattern!r} is not a valid regex ({error})") from None
        hits = {name for name in linear_names if regex.fullmatch(name)}
        if not hits:
            examples = ", ".join(linear_names[:3])
            raise PolicyError(
                f"quant.skip_modules: {pattern!r} matches no linear layer; patterns are full-matched "
                f"against full module names such as {examples}"
            )
        chosen |= hits
    return chosen


def plan(
    linear_names: Sequence[str],
    policy: Policy | str,
    parts: ModelParts = ModelParts(),
    skip_modules: Iterable[str] = (),
    calibrated: Iterable[str] = (),
) -> QuantPlan:
    """Split ``linear_names`` into quantized and kept for ``policy``.

    ``skip_modules`` (regexes) are kept on top of any policy; ``calibrated`` is the list a
    ``dynamic`` calibration chose. Order follows ``linear_names``.
    """
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
    policy = Policy(policy)
    kept_parts = PART_POLICIES.get(policy, ())
    keep = matching(linear_names, skip_modules)
    keep |= set(calibrated) if policy is Policy.DYNAMIC else set()
    unknown = keep - set(linear_names)
    if unknown:
        raise PolicyError(f"not linear layers of this model: {sorted(unknown)[:5]}")
    quantized, kept = [], []
    for name in linear_names:
        stays = always_kept(name) or name in keep or parts.part_of(name) in kept_parts
        (kept if stays else quantized).append(name)
    return QuantPlan(quantized=tuple(quantized), kept=tuple(kept))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
