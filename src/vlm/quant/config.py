"""How the frozen base weights are stored: the quantization settings a run asks for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes settings plus the policy that decides which linear layers stay in 16-bit.

    ``policy`` is one of :data:`vlm.quant.policies.POLICIES`; ``skip_modules`` are regexes,
    full-matched against full module names, kept in 16-bit on top of it (the whole list for
    ``explicit``). ``dynamic`` chooses by calibration (see :mod:`vlm.quant.calibrate`).
    """

    method: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    policy: str = "standard"
    skip_modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quant.method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"quant.compute_dtype={self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        from .policies import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"quant.policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.policy == "explicit" and not self.skip_modules:
            raise ValueError("quant.policy=explicit needs quant.skip_modules: a list of regexes of layers to keep in 16-bit")
        if self.policy == "dynamic" and not self.quantizes:
            raise ValueError("quant.policy=dynamic chooses layers to quantize, so quant.method cannot be none")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def quantizes(self) -> bool:
        return self.method != "none"
