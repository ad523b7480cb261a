"""What a run spread over several processes needs beyond Lightning's strategies: which process is
the first before any process group exists, per-rank numbers gathered for the run summary, and the
FSDP settings a QLoRA model needs (its units, no casting of the packed 4-bit weights, the
trainable weights gathered whole for saving).

Lightning starts the other ranks of a one-node run by running the same command again in child
processes (``LOCAL_RANK`` set), once training starts; SLURM and ``torchrun`` start every rank at
once. Either way each rank builds its own model, and only the first process writes the run's files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import nn

# Segments that FSDP and activation checkpointing insert into parameter names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_first_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank 0, as the launcher's environment says before any process
    group exists: ``RANK`` (torchrun), ``LOCAL_RANK`` and ``NODE_RANK`` (Lightning's own launcher,
    which sets them in the ranks it starts), ``SLURM_PROCID`` (one SLURM task per rank). A process
    without any of them is a run of its own."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0
    for key in ("SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in env:
            return int(env[key]) == 0
    return True


def process_label(environ: Mapping[str, str] | None = None) -> str:
    """This process's rank for file names and messages (``rank1``; ``node1-rank0`` where only the
    node and local rank are known)."""
    env = os.environ if environ is None else environ
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in env:
            return f"rank{env[key]}"
    node, local = env.get("NODE_RANK", "0"), env.get("LOCAL_RANK", "0")
    return f"rank{local}" if node == "0" else f"node{node}-rank{local}"


# --------------------------------------------------------------------------- numbers per rank
def gather_per_rank(trainer: lightning.Trainer, values: Mapping[str, float | int | None]) -> dict[str, list[float | None]]:
    """Each of ``values`` as every rank has it, in rank order (``None`` stays ``None``).

    A collective: every rank must call it, with the same keys. One process: ``[value]`` each.
    """
    keys = list(values)
    if trainer.world_size <= 1:
        return {key: [None if values[key] is None else float(values[key])] for key in keys}
    local = torch.tensor([float("nan") if values[k] is None else float(values[k]) for k in keys], dtype=torch.float64)
    gathered = _all_gather(trainer, local)
    return {key: [None if torch.isnan(v) else float(v) for v in gathered[:, i]] for i, key in enumerate(keys)}


def same_on_every_rank(trainer: lightning.Trainer, fingerprint: torch.Tensor) -> bool:
    """Whether ``fingerprint`` (a 1-d float64 tensor, the same length on every rank) is equal on all ranks."""
    if trainer.world_size <= 1:
        return True
    gathered = _all_gather(trainer, fingerprint)
    return bool((gathered == gathered[0]).all())


def _all_gather(trainer: lightning.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """``[world_size, *tensor.shape]`` on the CPU: every rank's ``tensor``, sent from the rank's device."""
    import torch.distributed as dist

    local = tensor.to(trainer.strategy.root_device)
    parts = [torch.empty_like(local) for _ in range(trainer.world_size)]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu()


# --------------------------------------------------------------------------- FSDP
def uses_fsdp(trainer: lightning.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP and activation checkpointing put around modules."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


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
    """What :class:`~lightning.pytorch.strategies.FSDPStrategy` is given for a QLoRA model besides
    its config: the units (:func:`fsdp_units`) and a mixed precision that casts no parameter.

    FSDP's own mixed precision would cast every unit's flat parameter to one dtype, the packed
    4-bit weights included, whose bytes are not numbers. Without it the LoRA weights stay fp32
    (master and compute copy), and the run's ``bf16-mixed`` autocast computes in bf16 as it does
    on one GPU. Activations are checkpointed per decoder layer by the model itself
    (``model.gradient_checkpointing``), inside each unit, as on one GPU.
    """
    from torch.distributed.fsdp import MixedPrecision

    return {"auto_wrap_policy": fsdp_units(layer_classes), "mixed_precision": MixedPrecision()}


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` is wrapped by FSDP (as :meth:`VisionLanguageFineTuner.configure_model` wraps the model)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def full_trainable_state(trainer: lightning.Trainer, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Where ``module`` is wrapped by FSDP: its trainable parameters gathered whole onto rank 0's
    CPU, by their names within the wrapped module (the PEFT model's, for ``save_pretrained``);
    ``None`` on the other ranks and without FSDP (each rank then holds them whole already).

    A collective under FSDP: every rank must call it.
    """
    if not is_fsdp(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(module, options=options)
    if not trainer.is_global_zero:
        return None
    trainable = {clean_name(name) for name, p in module.named_parameters() if p.requires_grad}
    return {name: value for name, value in state.items() if name in trainable}


@contextmanager
def one_at_a_time(lock_path: Path) -> Iterator[None]:
    """Processes holding the same lock file run the block one after another (ranks that start
    together preparing the files they share); where the file system has no locks, they just run."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            try:
                fcntl.flock(handle, fcntl.LOCK_UN)
            except OSError:
                pass
