"""What a run spread over several processes needs beyond Lightning's strategies: which process is
the first before any process group exists, per-rank numbers gathered for the run summary, and
parameter names without the wrappers of FSDP and activation checkpointing (FSDP itself:
:mod:`vlm.training.fsdp`).

Lightning starts the other ranks of a one-node run by running the same command again in child
processes (``LOCAL_RANK`` set), once training starts; SLURM and ``torchrun`` start every rank at
once. Either way each rank builds its own model, and only the first process writes the run's files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import lightning
import torch

# Segments that FSDP and activation checkpointing insert into parameter names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP and activation checkpointing put around modules."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


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
