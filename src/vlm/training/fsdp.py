"""FSDP for a QLoRA model: the units it is cut into, no casting of the packed 4-bit weights, and
checkpoints that hold what trains.

A checkpoint of a QLoRA run needs the LoRA weights (whole, one file, as with one device) and the
optimizer's state of them; the frozen 4-bit base comes from the pretrained checkpoint. Lightning's
FSDP strategy instead gathers the whole model's state dict through ``module.state_dict()``, which
copies every frozen weight to rank 0 at each checkpoint and, where a unit holds only frozen weights
that no gradient reaches (a vision tower run forward only), fails: FSDP leaves that unit's
parameters unregistered after the backward, so they are missing from the state dict it then
asserts on. :class:`QLoRAFSDPStrategy` gathers the trainable units alone, one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import nn
from torch.optim import Optimizer

from vlm.errors import ConfigError
from vlm.training.distributed import clean_name

log = logging.getLogger(__name__)


def uses_fsdp(trainer: lightning.Trainer) -> bool:
    return isinstance(trainer.strategy, FSDPStrategy)


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` is wrapped by FSDP (as :meth:`VisionLanguageFineTuner.configure_model` wraps the model)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


# --------------------------------------------------------------------------- units
def is_fsdp_unit(module: nn.Module, layer_classes: frozenset[type]) -> bool:
    """Whether FSDP makes ``module`` a unit of its own: a decoder layer (of ``layer_classes``), or a
    leaf module with a trainable weight (each LoRA matrix)."""
    if isinstance(module, tuple(layer_classes)):
        return True
    weight = getattr(module, "weight", None)
    return next(module.children(), None) is None and isinstance(weight, nn.Parameter) and weight.requires_grad


def fsdp_units(layer_classes: frozenset[type]) -> Any:
    """The FSDP auto-wrap policy of a QLoRA model (:func:`is_fsdp_unit`).

    FSDP flattens a unit's parameters into one tensor, which must have one dtype: the frozen
    weights of a decoder layer (the packed 4-bit ones stored as bf16, norms and 16-bit layers in
    bf16) share one, the fp32 LoRA matrices another; with units of their own they never mix. What
    is left (embeddings, vision tower, output head, all frozen) forms the root unit.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy(lambda module: is_fsdp_unit(module, layer_classes))


def fsdp_arguments(layer_classes: frozenset[type]) -> dict[str, Any]:
    """What :class:`QLoRAFSDPStrategy` is given for a QLoRA model besides its config: the units
    (:func:`fsdp_units`) and a mixed precision that casts no parameter.

    FSDP's own mixed precision would cast every unit's flat parameter to one dtype, the packed
    4-bit weights included, whose bytes are not numbers. Without it the LoRA weights stay fp32
    (master and compute copy), and the run's ``bf16-mixed`` autocast computes in bf16 as it does
    on one GPU. Activations are checkpointed per decoder layer by the model itself
    (``model.checkpointing``), inside each unit, as on one GPU.
    """
    from torch.distributed.fsdp import MixedPrecision

    return {"auto_wrap_policy": fsdp_units(layer_classes), "mixed_precision": MixedPrecision()}


def trainable_units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP units of ``root`` whose own module holds trainable weights (by the policy above, each
    LoRA matrix), with their names in ``root``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [
        (name, unit) for name, unit in root.named_modules()
        if isinstance(unit, FullyShardedDataParallel)
        and any(p.requires_grad for p in unit.module.parameters(recurse=False))
    ]


def _initialize_roots(root: nn.Module) -> None:
    """Let the outermost FSDP units of ``root`` set themselves up as roots, as their first forward
    would. A checkpoint is read back before any forward: summoned first, a LoRA unit would take
    itself for a root, and the real root's first forward then fails."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._runtime_utils import _lazy_init  # no public way without unsharding the root

    for unit in FullyShardedDataParallel.fsdp_modules(root, root_only=True):
        _lazy_init(unit, unit)


def _trainable_names(root: nn.Module) -> set[str]:
    return {clean_name(name) for name, p in root.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- trainable weights, whole
def gather_trainable(root: nn.Module, is_first_rank: bool) -> dict[str, torch.Tensor] | None:
    """The trainable weights of ``root`` gathered whole onto the first rank's CPU, unit by unit, by
    their names in ``root`` without wrapper segments; ``None`` on the other ranks.

    A collective: every rank must call it. Raises ``RuntimeError`` where a trainable weight lies
    outside the units gathered (a policy that put it into a unit with frozen weights).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    _initialize_roots(root)
    gathered: dict[str, torch.Tensor] = {}
    for name, unit in trainable_units(root):
        # Gathered on the GPU, one LoRA matrix at a time (FSDP offloads only sharded units itself).
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if is_first_rank:
                for parameter_name, value in unit.module.named_parameters(recurse=False):
                    gathered[clean_name(f"{name}.{parameter_name}")] = value.detach().to("cpu", copy=True)
    if not is_first_rank:
        return None
    missing = sorted(_trainable_names(root) - gathered.keys())
    if missing:
        raise RuntimeError(f"{len(missing)} trainable weights lie outside the units gathered, e.g. {missing[:3]}")
    return gathered


def scatter_trainable(root: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write the whole trainable weights ``state`` (names as :func:`gather_trainable` gives them)
    into ``root``'s units, each rank keeping its shard. A collective; every rank passes the same
    ``state``. Raises ``KeyError`` naming the weights ``state`` lacks."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    missing = sorted(_trainable_names(root) - state.keys())
    if missing:
        raise KeyError(f"the state lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
    _initialize_roots(root)
    for name, unit in trainable_units(root):
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
            for parameter_name, parameter in unit.module.named_parameters(recurse=False):
                value = state[clean_name(f"{name}.{parameter_name}")]
                if tuple(value.shape) != tuple(parameter.shape):
                    raise ConfigError(
                        f"{clean_name(f'{name}.{parameter_name}')}: {tuple(value.shape)} in the checkpoint, "
                        f"{tuple(parameter.shape)} now"
                    )
                parameter.copy_(value.to(parameter.device, parameter.dtype))


def save_adapter(trainer: lightning.Trainer, model: nn.Module, directory: Path) -> bool:
    """Write the PEFT adapter of ``model`` (a PEFT model, or one wrapped by FSDP) to ``directory``
    from rank 0; whether it was written. A collective under FSDP: every rank must call it.

    Under FSDP the LoRA weights are gathered whole (:func:`gather_trainable`) and written under the
    names PEFT gives them (the adapter name dropped). PEFT still writes the config and model card,
    but cannot pick the weights out itself: it finds them by module names, which FSDP's wrappers
    change inside the model.
    """
    state = gather_trainable(model, trainer.is_global_zero) if is_fsdp(model) else None
    if not trainer.is_global_zero:
        return False
    peft_model = model.module if is_fsdp(model) else model
    if not hasattr(peft_model, "save_pretrained"):
        log.warning("%s has no save_pretrained; adapter not saved", type(peft_model).__name__)
        return False
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    if state is not None:
        from safetensors.torch import save_file

        adapter = f".{peft_model.active_adapter}."
        weights = {name.replace(adapter, "."): value.contiguous() for name, value in state.items()}
        save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return True


# --------------------------------------------------------------------------- the strategy
class QLoRAFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy with checkpoints of what trains: the trainable weights gathered
    whole (:func:`gather_trainable`, one file written by rank 0, read back into each rank's
    shards), and each rank's optimizer state as that rank holds it (the optimizer sees the shards of
    the LoRA weights), so a run resumes with the same number of ranks exactly where it stopped.

    Configured as ``trainer=fsdp``; ``state_dict_type`` must stay ``full``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._state_dict_type != "full":
            raise ConfigError(
                f"trainer.strategy.state_dict_type={self._state_dict_type}: a QLoRA checkpoint holds the "
                "trainable weights gathered whole; use 'full'"
            )

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # through load_optimizer_state_dict below, after the model is wrapped

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return gather_trainable(self.lightning_module, self.is_global_zero) or {}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Every rank reads the one file; the weights go in through load_model_state_dict, after the
        # LightningModule's on_load_checkpoint has checked what the checkpoint was written for.
        return Strategy.load_checkpoint(self, self.broadcast(checkpoint_path), weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        scatter_trainable(self.lightning_module, checkpoint["state_dict"])

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        import torch.distributed as dist
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.utils._pytree import tree_map

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        local = tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, optimizer.state_dict())
        if self.world_size == 1:
            return {"per_rank": [local]}
        states: list[Any] | None = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(local, states, dst=0)
        return {"per_rank": states} if self.is_global_zero else {}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get("optimizer_states")
        if not saved:
            return
        if len(saved) != len(self.optimizers):
            raise ConfigError(f"the checkpoint holds {len(saved)} optimizer states and this run has "
                              f"{len(self.optimizers)} optimizers")
        for optimizer, state in zip(self.optimizers, saved):
            per_rank = state.get("per_rank")
            if per_rank is None:
                raise ConfigError("the checkpoint's optimizer state was not written by trainer=fsdp")
            if len(per_rank) != self.world_size:
                raise ConfigError(
                    f"the checkpoint's optimizer state is sharded over {len(per_rank)} ranks and this run has "
                    f"{self.world_size}: resume with trainer.devices={len(per_rank)} (times nodes)"
                )
            optimizer.load_state_dict(per_rank[self.global_rank])
