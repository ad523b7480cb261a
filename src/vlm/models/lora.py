"""Wrapping a loaded model with PEFT LoRA adapters."""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from vlm.quant.policies import linear_layer_names

from .families import ModelFamily

# LoraConfig fields that LoraSettings sets itself (→ its own key), so ``lora.extra`` must not.
_SET_BY_SETTINGS = {
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target_modules",
    "use_rslora": "use_rslora",
    "bias": None,
}
_TARGET_RULE = (
    "a list entry matches a module whose full name equals it or ends with '.' + it; "
    "a string is a regex full-matched against full module names"
)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters. ``target_modules="auto"`` uses the family's language-model linears;
    otherwise a list of short module names (``["q_proj", "v_proj"]``) or one regex over full names,
    matched as PEFT matches them (see :func:`lora_target_names`). ``extra``: further
    ``peft.LoraConfig`` arguments."""

    r: int = 16
    alpha: int | float = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "auto"
    use_rslora: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"lora.r={self.r!r} must be a positive integer")
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be a positive number")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r} must be a number in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"lora.use_rslora={self.use_rslora!r} must be true or false")
        object.__setattr__(self, "target_modules", _checked_targets(self.target_modules))
        object.__setattr__(self, "extra", _checked_extra(self.extra))


def _checked_targets(targets: object) -> str | list[str]:
    """``targets`` as a string or a plain list of strings; raises ``ValueError`` naming ``lora.target_modules``."""
    allowed = "give 'auto', a list of module names or a regex"
    if isinstance(targets, str):
        if not targets.strip():
            raise ValueError(f"lora.target_modules is empty: {allowed}")
        if targets != "auto":
            try:
                re.compile(targets)
            except re.error as error:
                raise ValueError(f"lora.target_modules={targets!r} is not a valid regex ({error}): {allowed}") from None
        return targets
    if isinstance(targets, Sequence):
        names = list(targets)  # also a Hydra ListConfig
        if not names:
            raise ValueError(f"lora.target_modules is empty: {allowed}")
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"lora.target_modules={names!r} must hold module names (non-empty strings): {allowed}")
        return names
    raise ValueError(f"lora.target_modules={targets!r} must be 'auto', a list of module names or a regex")


def _checked_extra(extra: object) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"lora.extra={extra!r} must be a mapping of peft.LoraConfig arguments")
    extra = dict(extra)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    for key in extra:
        if key in _SET_BY_SETTINGS:
            own = _SET_BY_SETTINGS[key]
            where = f"set it with lora.{own}" if own else "LoRA here never trains biases"
            raise ValueError(f"lora.extra.{key} is set by the LoRA settings themselves: {where}")
        if key not in known:
            raise ValueError(f"lora.extra.{key} is not a peft.LoraConfig argument; known: {', '.join(sorted(known))}")
    return extra


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule (``peft.tuners.tuners_utils.check_target_module_exists``): a string is a regex
    full-matched against the full name; a list matches a name equal to an entry or ending in
    ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def lora_target_names(model: nn.Module, family: ModelFamily, settings: LoraSettings) -> list[str]:
    """Full names of the linear layers of ``model`` (loaded, or its weightless skeleton) that
    ``settings`` puts LoRA adapters on, in module order; ``extra["exclude_modules"]`` is honoured
    the way PEFT honours it.

    Raises:
        ValueError naming ``lora.target_modules`` when no linear layer matches, with the names
        the model's linear layers have.
    """
    targets = family.lora_targets if settings.target_modules == "auto" else settings.target_modules
    linears = linear_layer_names(model)
    names = [name for name in linears if _matches(name, targets)]
    excluded = settings.extra.get("exclude_modules")
    if excluded:
        names = [name for name in names if not _matches(name, excluded)]
    if names:
        return names
    shown = f"{settings.target_modules!r}" + (f" (the family's regex {targets!r})" if settings.target_modules == "auto" else "")
    if not linears:
        raise ValueError(f"lora.target_modules={shown}: the model has no linear layer at all")
    short = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linears))
    excluding = " once lora.extra.exclude_modules is left out" if excluded else ""
    raise ValueError(
        f"lora.target_modules={shown} matches no linear layer of the model{excluding} ({_TARGET_RULE}); "
        f"its linear layers end in {', '.join(short[:12])}{', ...' if len(short) > 12 else ''} "
        f"(e.g. {', '.join(linears[:2])})"
    )


def apply_lora(model: nn.Module, family: ModelFamily, settings: LoraSettings) -> PeftModel:
    """Freeze ``model`` and add LoRA adapters on :func:`lora_target_names` (handed to PEFT as exact
    full names); the adapters are fp32, the frozen weights keep their dtype."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_names(model, family, settings),
        use_rslora=settings.use_rslora,
        bias="none",
        **settings.extra,
    )
    return get_peft_model(model, config)
