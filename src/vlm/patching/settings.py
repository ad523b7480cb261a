"""Which kernels to patch in: one switch per kernel (the ``kernels`` config group)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch

KERNELS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy", "lora")


@dataclass(frozen=True)
class KernelSettings:
    """One switch per kernel, so that an ablation can sweep them (``kernels.rms_norm=false``).

    ``geglu`` applies to GeGLU MLPs (Gemma 3's); ``swiglu`` to SwiGLU ones (Llama, Qwen, SmolVLM). A switch is
    ``true``, ``false`` or ``auto``: on where the model is built on CUDA, off elsewhere (``kernels=auto``, the
    default, turns on the loss kernel so). What reads the switches takes them :meth:`resolved` for the device.
    """

    rms_norm: bool | str = False
    layer_norm: bool | str = False
    rope: bool | str = False
    swiglu: bool | str = False
    geglu: bool | str = False
    cross_entropy: bool | str = False
    lora: bool | str = False

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, bool) and value != "auto":
                raise ValueError(f"kernels.{name}={value!r} must be true, false or auto")

    @property
    def is_resolved(self) -> bool:
        """Whether every switch is a bool (no ``auto`` left)."""
        return not self._automatic()

    def resolved(self, device: str) -> KernelSettings:
        """These switches for a model built on ``device`` (``cuda``, ``cuda:1``, ``cpu``, ...): each ``auto`` on
        where it is CUDA, off elsewhere; ``true``/``false`` as they are."""
        return dataclasses.replace(self, **dict.fromkeys(self._automatic(), _auto_is_on(device)))

    def auto_summary(self, device: str) -> str:
        """What the ``auto`` switches became on ``device``, in words (``cross_entropy: auto → off (not CUDA)``);
        empty where no switch is ``auto``."""
        automatic = self._automatic()
        if not automatic:
            return ""
        return f"{', '.join(automatic)}: auto → {'on (CUDA)' if _auto_is_on(device) else 'off (not CUDA)'}"

    def _automatic(self) -> list[str]:
        return [name for name, value in asdict(self).items() if value == "auto"]

    def enabled(self) -> list[str]:
        """The kernels switched on; raises ``ValueError`` while a switch is still ``auto`` (resolve it first)."""
        if not self.is_resolved:
            raise ValueError(f"{self} holds auto switches: take KernelSettings.resolved(device) first")
        return [name for name, on in asdict(self).items() if on]


def _auto_is_on(device: str) -> bool:
    """What an ``auto`` switch is for a model built on ``device``: on where it is CUDA."""
    return torch.device(device).type == "cuda"
