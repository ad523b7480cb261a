"""How the frozen base weights are stored: the quantization settings a run asks for."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .policies import POLICIES, ModelParts, Policy, QuantPlan, plan

METHODS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# How bitsandbytes may store the packed 4-bit weights: the bytes, or viewed as a float dtype.
STORAGE_DTYPES = {"uint8": torch.uint8, **COMPUTE_DTYPES}


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes settings plus the policy that decides which linear layers stay in 16-bit.

    ``policy`` is one of :data:`vlm.quant.policies.POLICIES`; ``skip_modules`` are regexes,
    full-matched against full module names, kept in 16-bit on top of it (the whole list for
    ``explicit``). ``dynamic`` chooses by calibration (see :mod:`vlm.quant.calibrate`).

    ``quant_storage`` is the dtype the packed 4-bit weights are stored as (the same bytes either
    way); ``None`` lets the strategy choose (:meth:`for_strategy`): bytes, or the compute dtype
    where FSDP shards them.
    """

    method: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    policy: Policy = Policy.STANDARD
    skip_modules: tuple[str, ...] = field(default_factory=tuple)
    quant_storage: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quant.method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"quant.compute_dtype={self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"quant.policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        object.__setattr__(self, "policy", Policy(self.policy))
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.policy is Policy.EXPLICIT and not self.skip_modules:
            raise ValueError("quant.policy=explicit needs quant.skip_modules: a list of regexes of layers to keep in 16-bit")
        if self.calibrates and not self.quantizes:
            raise ValueError("quant.policy=dynamic chooses layers to quantize, so quant.method cannot be none")
        if self.quant_storage is not None and self.quant_storage not in STORAGE_DTYPES:
            raise ValueError(f"quant.quant_storage={self.quant_storage!r} is not one of {', '.join(STORAGE_DTYPES)} or null")

    def for_strategy(self, shards_parameters: bool) -> QuantConfig:
        """This config with the storage a strategy needs: FSDP (``shards_parameters``) flattens each
        unit's weights into one tensor of one dtype, so the packed 4-bit weights are stored in the
        compute dtype of the frozen weights beside them; otherwise as bytes, unless set.

        Raises ``ValueError`` naming the key when the strategy cannot shard what was asked for.
        """
        if not shards_parameters or not self.quantizes:
            return self
        if self.method == "int8":
            raise ValueError("quant.method=int8 cannot be sharded by FSDP (bitsandbytes' 8-bit weights keep their "
                             "scales beside the weight): use nf4 or fp4, or trainer=ddp")
        if self.quant_storage not in (None, self.compute_dtype):
            raise ValueError(
                f"quant.quant_storage={self.quant_storage} cannot be sharded by FSDP beside frozen "
                f"{self.compute_dtype} weights: leave it null or set it to quant.compute_dtype ({self.compute_dtype})"
            )
        return replace(self, quant_storage=self.compute_dtype)

    @property
    def torch_quant_storage(self) -> torch.dtype:
        """The storage dtype of the packed 4-bit weights (bytes where the strategy did not choose)."""
        return STORAGE_DTYPES[self.quant_storage or "uint8"]

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def quantizes(self) -> bool:
        return self.method != "none"

    def resolve(self, linear_names: Sequence[str], parts: ModelParts = ModelParts(), calibrated: Iterable[str] = ()) -> QuantPlan:
        """This config's policy as exact names of ``linear_names``; ``calibrated`` is ``dynamic``'s choice.

        Raises :class:`~vlm.quant.policies.PolicyError` (a ``ConfigError``) when it cannot be
        resolved, e.g. for a ``skip_modules`` regex that matches no layer.
        """
        if not self.quantizes:
            return QuantPlan.unquantized(linear_names)
        return plan(linear_names, self.policy, parts, self.skip_modules, calibrated)

    @property
    def calibrates(self) -> bool:
        """Whether the layers kept in 16-bit are chosen by calibration (``dynamic``)."""
        return self.policy is Policy.DYNAMIC
