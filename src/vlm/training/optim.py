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

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["AdamWSettings", "LRScheduleConfig", "adamw", "cosine_with_warmup", "lr_lambda"]


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
                f"scheduler.total_steps={t!r} must be an int >= 1 (or null to let the trainer decide)"
            )
        warmup_rule = "an int >= 0 (optimizer steps) or a float in [0, 1) (a fraction of scheduler.total_steps)"
        if _is_int(w):
            if w < 0:
                raise ValueError(f"scheduler.warmup_steps={w!r} must be {warmup_rule}")
            if t is not None and w > t:
                raise ValueError(
                    f"scheduler.warmup_steps={w!r} must be <= scheduler.total_steps ({t}); use a float "
                    f"in [0, 1) for a fraction of total_steps"
                )
        elif _is_real(w):
            if not (0.0 <= float(w) < 1.0):
                raise ValueError(f"scheduler.warmup_steps={w!r} must be {warmup_rule}")
        else:
            raise ValueError(f"scheduler.warmup_steps={w!r} must be {warmup_rule}")
        if not (_is_real(m) and 0.0 <= float(m) <= 1.0):
            raise ValueError(f"scheduler.min_lr_ratio={m!r} must be a float in [0, 1]")

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


@dataclass(frozen=True)
class AdamWSettings:
    """The values of the ``optimizer`` config group for :func:`adamw`, checked where they enter.

    The config builds :func:`adamw` as a partial (``_partial_: true``) that the LightningModule
    calls only at fit time, after the weights load; ``vlm.cli.checks`` builds these settings from
    the same values when it reads the config, so a bad value stops the run before anything loads.

    Attributes:
        lr: the peak learning rate, a float > 0.
        weight_decay: decoupled weight decay, a float >= 0.
        betas: two floats in [0, 1).
        eps: a float > 0.
        paged_8bit: ``True``, ``False`` or ``"auto"`` (the strings ``"true"``/``"false"`` too).
        fused_8bit: where ``paged_8bit`` picks the 8-bit states, keep them on the device and step each
            parameter group in one launch (:class:`vlm.training.fused_adamw.FusedAdamW8bit`) instead of
            bitsandbytes' paged optimizer, which launches and waits once per tensor. ``True``, ``False``
            or ``"auto"``: on wherever the 8-bit states are used, unless FSDP shards the parameters
            (see :meth:`resolved`).
    """

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    paged_8bit: bool | str = "auto"
    fused_8bit: bool | str = "auto"

    def __post_init__(self) -> None:
        lr, wd, eps = self.lr, self.weight_decay, self.eps
        if not (_is_real(lr) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"optimizer.lr={lr!r} must be a number > 0")
        if not (_is_real(wd) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"optimizer.weight_decay={wd!r} must be a number >= 0")
        if not (_is_real(eps) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"optimizer.eps={eps!r} must be a number > 0")
        betas = self.betas
        valid = (
            isinstance(betas, Sequence)
            and not isinstance(betas, str)
            and len(betas) == 2
            and all(_is_real(b) and 0.0 <= float(b) < 1.0 for b in betas)
        )
        if not valid:
            shown = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else betas
            raise ValueError(f"optimizer.betas={shown!r} must be two floats in [0, 1), e.g. [0.9, 0.999]")
        # Also turns an OmegaConf ListConfig into a tuple.
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        object.__setattr__(self, "paged_8bit", _switch(self.paged_8bit, "optimizer.paged_8bit"))
        object.__setattr__(self, "fused_8bit", _switch(self.fused_8bit, "optimizer.fused_8bit"))

    def resolved(self, device: str, sharded: bool = False, fp32: bool = True) -> AdamWSettings:
        """These settings with each ``"auto"`` decided for parameters on ``device`` (``cuda``, ``cuda:1``,
        ``cpu``, ...): ``paged_8bit`` is 8-bit on CUDA; ``fused_8bit`` is on where the 8-bit states are used,
        unless a strategy shards the parameters (``sharded``: FSDP, with which ``FusedAdamW8bit`` was not tried)
        or one of them is not ``fp32`` (``fp32=False``; ``FusedAdamW8bit`` updates fp32 parameters only).
        ``True`` and ``False`` stay as given (``paged_8bit=True`` off CUDA is refused by :func:`adamw`)."""
        paged = torch.device(device).type == "cuda" if self.paged_8bit == "auto" else self.paged_8bit
        fused = paged and not sharded and fp32 if self.fused_8bit == "auto" else self.fused_8bit
        return dataclasses.replace(self, paged_8bit=paged, fused_8bit=fused)


def _switch(value: Any, key: str) -> bool | str:
    if isinstance(value, bool):
        return value
    mapping = {"auto": "auto", "true": True, "false": False}
    if isinstance(value, str) and value.strip().lower() in mapping:
        return mapping[value.strip().lower()]
    raise ValueError(f"{key}={value!r} must be true, false or 'auto'")


def adamw(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    paged_8bit: bool | str = "auto",
    fused_8bit: bool | str = "auto",
) -> Optimizer:
    """AdamW over ``params``; the other arguments are checked as :class:`AdamWSettings`.

    ``paged_8bit``: ``"auto"`` uses 8-bit states when every parameter lives on CUDA and
    ``torch.optim.AdamW`` otherwise; ``True`` forces the 8-bit states (they need CUDA: ``ValueError``
    otherwise); ``False`` always uses ``torch.optim.AdamW``. ``fused_8bit``: the 8-bit states in
    ``FusedAdamW8bit`` rather than in ``bitsandbytes.optim.PagedAdamW8bit``; ``"auto"`` is on where every
    parameter is fp32 (:meth:`AdamWSettings.resolved`; FSDP's run hands it ``False``, see
    :func:`vlm.cli.wiring.build_optimizer`).
    """
    settings = AdamWSettings(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, paged_8bit=paged_8bit,
                             fused_8bit=fused_8bit)
    items, tensors = _flatten_params(params)
    if not tensors:
        raise ValueError("adamw: got no parameters to optimize (is any parameter requires_grad=True?)")
    all_cuda = all(t.device.type == "cuda" for t in tensors)

    if settings.paged_8bit is True and not all_cuda:
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            "adamw: paged_8bit=True needs every parameter on a CUDA device (bitsandbytes' paged 8-bit "
            f"optimizer pages its state through CUDA unified memory), but parameters are on {devices}. "
            "Use paged_8bit='auto' or False to fall back to torch.optim.AdamW."
        )
    fp32 = all(t.dtype == torch.float32 for t in tensors)
    settings = settings.resolved("cuda" if all_cuda else "cpu", fp32=fp32)
    use_paged = settings.paged_8bit
    kwargs = {
        "lr": float(settings.lr),
        "betas": settings.betas,
        "eps": float(settings.eps),
        "weight_decay": float(settings.weight_decay),
    }
    if use_paged and settings.fused_8bit:
        from vlm.training.fused_adamw import FusedAdamW8bit

        return FusedAdamW8bit(items, **kwargs)
    if use_paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(items, **kwargs)
    return torch.optim.AdamW(items, **kwargs)
