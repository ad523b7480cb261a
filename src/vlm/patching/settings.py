"""Which kernels to patch in: one switch per kernel (the ``kernels`` config group)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

KERNELS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy", "lora")


@dataclass(frozen=True)
class KernelSettings:
    """One switch per kernel, so that an ablation can sweep them (``kernels.rms_norm=false``).

    ``geglu`` applies to GeGLU MLPs (Gemma 3's); ``swiglu`` to SwiGLU ones (Llama, Qwen, SmolVLM).
    """

    rms_norm: bool = False
    layer_norm: bool = False
    rope: bool = False
    swiglu: bool = False
    geglu: bool = False
    cross_entropy: bool = False
    lora: bool = False

    def enabled(self) -> list[str]:
        return [name for name, on in asdict(self).items() if on]
