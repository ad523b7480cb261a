"""Optimizer and learning-rate schedule factories.

Both are plain functions so Hydra can build them lazily::

    optimizer:
      _target_: vlm.training.optim.adamw
      _partial_: true
      lr: 2.0e-4
    scheduler:
      _target_: vlm.training.optim.LRScheduleConfig
      warmup_steps: 0.03
      total_steps: 1000

The LightningModule calls ``optimizer(trainable_params)`` and
``cosine_with_warmup(optimizer, scheduler)`` itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRScheduleConfig", "adamw", "cosine_with_warmup", "lr_lambda"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class LRScheduleConfig:
    """Linear warmup from 0 to the optimizer's lr, then cosine decay to ``min_lr_ratio * lr``.

    Attributes:
        warmup_steps: an int >= 0 is a number of optimizer steps; a float in [0, 1) is a
            fraction of ``total_steps`` (rounded to the nearest step).
        total_steps: the number of optimizer steps of the whole run (>= 1). ``None`` is
            accepted only by :class:`~vlm.training.module.VisionLanguageFineTuner`, which
            replaces it with ``trainer.estimated_stepping_batches``.
        min_lr_ratio: the final lr as a fraction of the peak lr, in [0, 1].
    """

    warmup_steps: int | float
    total_steps: int | None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        w, t, m = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if t is not None and not (_is_int(t) and t >= 1):
            raise ValueError(
                f"LRScheduleConfig.total_steps must be an int >= 1 (or None to let the trainer "
                f"decide), got {t!r}"
            )
        if _is_int(w):
            if w < 0:
                raise ValueError(
                    f"LRScheduleConfig.warmup_steps must be an int >= 0 (steps) or a float in [0, 1) "
                    f"(fraction of total_steps), got {w!r}"
                )
            if t is not None and w > t:
                raise ValueError(
                    f"LRScheduleConfig.warmup_steps ({w}) must be <= total_steps ({t}); use a float "
                    f"in [0, 1) for a fraction of total_steps"
                )
        elif _is_real(w):
            if not (0.0 <= float(w) < 1.0):
                raise ValueError(
                    f"LRScheduleConfig.warmup_steps must be an int >= 0 (steps) or a float in [0, 1) "
                    f"(fraction of total_steps), got {w!r}"
                )
        else:
            raise ValueError(
                f"LRScheduleConfig.warmup_steps must be an int >= 0 (steps) or a float in [0, 1) "
                f"(fraction of total_steps), got {w!r} of type {type(w).__name__}"
            )
        if not (_is_real(m) and 0.0 <= float(m) <= 1.0):
            raise ValueError(f"LRScheduleConfig.min_lr_ratio must be a float in [0, 1], got {m!r}")

    @classmethod
    def coerce(cls, value: LRScheduleConfig | Mapping[str, Any] | None) -> LRScheduleConfig | None:
        """Accept an instance, a plain mapping (e.g. a Hydra ``DictConfig``) or ``None``."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            kwargs = {k: v for k, v in dict(value).items() if not str(k).startswith("_")}
            return cls(**kwargs)
        raise TypeError(f"scheduler must be an LRScheduleConfig, a mapping or None, got {type(value).__name__}")

    def resolved_warmup_steps(self, total_steps: int | None = None) -> int:
        """The warmup length in steps (a fraction is turned into steps of ``total_steps``)."""
        total = self.total_steps if total_steps is None else total_steps
        if total is None:
            raise ValueError("LRScheduleConfig.total_steps is None: pass total_steps explicitly")
        if _is_int(self.warmup_steps):
            return int(self.warmup_steps)
        return int(round(float(self.warmup_steps) * total))


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def cosine_with_warmup(optimizer: Optimizer, config: LRScheduleConfig) -> LambdaLR:
    """A per-step ``LambdaLR``: 0 at step 0, the optimizer's lr at ``warmup`` steps,
    ``min_lr_ratio * lr`` at ``total_steps`` and after.

    Call ``scheduler.step()`` after every optimizer step (Lightning's ``interval: "step"``).
    """
    config = LRScheduleConfig.coerce(config)
    if config is None or config.total_steps is None:
        raise ValueError("cosine_with_warmup needs an LRScheduleConfig with total_steps set (an int >= 1)")
    total = int(config.total_steps)
    warmup = min(config.resolved_warmup_steps(total), total)
    min_ratio = float(config.min_lr_ratio)

    def schedule(step: int) -> float:
        return lr_lambda(step, warmup, total, min_ratio)

    return LambdaLR(optimizer, schedule)


def _flatten_params(params: Iterable[Any]) -> tuple[list[Any], list[torch.Tensor]]:
    """Materialise ``params`` (tensors or param-group dicts); return it and the flat tensor list."""
    items = list(params)
    tensors: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, Mapping):
            group = item["params"]
            tensors.extend([group] if isinstance(group, torch.Tensor) else list(group))
        else:
            tensors.append(item)
    return items, tensors


def adamw(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    paged_8bit: bool | str = "auto",
) -> Optimizer:
    """AdamW over ``params``.

    ``paged_8bit``: ``"auto"`` uses ``bitsandbytes.optim.PagedAdamW8bit`` when every parameter
    lives on CUDA and ``torch.optim.AdamW`` otherwise; ``True`` forces the paged 8-bit
    optimizer (it needs CUDA and raises ``ValueError`` otherwise); ``False`` always uses
    ``torch.optim.AdamW``.
    """
    if isinstance(paged_8bit, str):
        key = paged_8bit.strip().lower()
        mapping = {"auto": "auto", "true": True, "false": False}
        if key not in mapping:
            raise ValueError(f"adamw: paged_8bit must be True, False or 'auto', got {paged_8bit!r}")
        paged_8bit = mapping[key]
    elif not isinstance(paged_8bit, bool):
        raise ValueError(f"adamw: paged_8bit must be True, False or 'auto', got {paged_8bit!r}")
    if not (_is_real(lr) and float(lr) >= 0.0):
        raise ValueError(f"adamw: lr must be a float >= 0, got {lr!r}")
    if not (_is_real(weight_decay) and float(weight_decay) >= 0.0):
        raise ValueError(f"adamw: weight_decay must be a float >= 0, got {weight_decay!r}")
    betas_t = tuple(float(b) for b in betas)  # also turns an OmegaConf ListConfig into a tuple
    if len(betas_t) != 2 or not all(0.0 <= b < 1.0 for b in betas_t):
        raise ValueError(f"adamw: betas must be two floats in [0, 1), got {betas!r}")

    items, tensors = _flatten_params(params)
    if not tensors:
        raise ValueError("adamw: got no parameters to optimize (is any parameter requires_grad=True?)")
    all_cuda = all(t.device.type == "cuda" for t in tensors)

    if paged_8bit is True and not all_cuda:
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            "adamw: paged_8bit=True needs every parameter on a CUDA device (bitsandbytes' paged 8-bit "
            f"optimizer pages its state through CUDA unified memory), but parameters are on {devices}. "
            "Use paged_8bit='auto' or False to fall back to torch.optim.AdamW."
        )
    use_paged = all_cuda if paged_8bit == "auto" else bool(paged_8bit)
    if use_paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(
            items, lr=float(lr), betas=betas_t, eps=float(eps), weight_decay=float(weight_decay)
        )
    return torch.optim.AdamW(items, lr=float(lr), betas=betas_t, eps=float(eps), weight_decay=float(weight_decay))
