"""Which model a run trains: the ``model`` config group becomes a :class:`ModelSpec`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpointing import check_checkpointing
from .compiling import check_compile
from .families import FAMILIES

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")

_PATH_STARTS = ("/", "./", "../", "~")


def looks_like_local_path(value: str) -> bool:
    """Whether ``value`` can only mean a local path, never a Hub id.

    It does when it starts with ``/``, ``./``, ``../`` or ``~``, is ``.`` or ``..``, holds more
    than one ``/`` or a backslash (or this system's own separator), since a Hub id is ``name`` or
    ``org/name``. A relative ``org/name`` is ambiguous: it is a local directory where one exists
    (as for ``from_pretrained``), else a Hub id.
    """
    separators = {"\\", os.sep} - {"/"}
    return (
        value.startswith(_PATH_STARTS)
        or value in (".", "..")
        or value.count("/") > 1
        or any(sep in value for sep in separators)
    )


def checkpoint_problem(checkpoint: str) -> str | None:
    """What is wrong with ``model.checkpoint=checkpoint`` (``None``: nothing), by the rule of
    :class:`ModelSpec`: an existing directory must hold a ``config.json``; a value that looks like a
    path (:func:`looks_like_local_path`) must be such a directory; anything else must be a Hub id."""
    shown = f"model.checkpoint={checkpoint!r}"
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{shown} is a directory without a config.json: give a saved checkpoint's directory (save_pretrained writes one)"
        return None
    if looks_like_local_path(checkpoint):
        what = "is a file" if path.exists() else "does not exist"
        return (
            f"{shown} is a local path (it starts with /, ./, ../ or ~, or has more than one /) but {what}: "
            "give an existing directory holding a checkpoint's config.json, or a Hub id (name or org/name)"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(checkpoint)
    except HFValidationError:
        return (
            f"{shown} is neither an existing local directory nor a Hub id: a Hub id is name or org/name "
            "of letters, digits, '-', '_' and '.' (e.g. Qwen/Qwen2-VL-7B-Instruct)"
        )
    return None


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint and how to load it.

    ``checkpoint`` is a local directory or a Hub id; ``None`` builds the family's tiny variant
    into ``tiny_dir`` and loads it from there, through the same ``from_pretrained`` path. Which one
    a value is: an existing directory is local (and must hold a ``config.json``); a value that
    starts with ``/``, ``./``, ``../`` or ``~`` or has more than one ``/`` is a local path and must
    be such a directory (``~`` is expanded); anything else is a Hub id, ``name`` or ``org/name``.
    """

    family: str
    checkpoint: str | None = None
    tiny_dir: str | None = None
    attn_implementation: str = "sdpa"
    checkpointing: str = "standard"  # none | standard | offload (vlm.models.checkpointing)
    compile: str = "auto"  # none | layers | auto: layers on CUDA where it can (vlm.models.compiling)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not a supported family; known: {', '.join(sorted(FAMILIES))}")
        if self.checkpoint is not None:
            if isinstance(self.checkpoint, os.PathLike):
                object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))
            if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
                raise ValueError(
                    f"model.checkpoint={self.checkpoint!r} must be a local directory, a Hub id (name or org/name) "
                    "or null (build the family's tiny model into model.tiny_dir)"
                )
            if self.checkpoint.startswith("~"):
                object.__setattr__(self, "checkpoint", os.path.expanduser(self.checkpoint))
            problem = checkpoint_problem(self.checkpoint)
            if problem:
                raise ValueError(problem)
        elif not self.tiny_dir:
            raise ValueError("model.checkpoint is null and model.tiny_dir is not set: give a checkpoint or a tiny_dir")
        if self.tiny_dir is not None and not isinstance(self.tiny_dir, str | os.PathLike):
            raise ValueError(f"model.tiny_dir={self.tiny_dir!r} must be a directory path or null")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attn_implementation={self.attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        check_checkpointing(self.checkpointing)
        check_compile(self.compile)

    @property
    def is_tiny(self) -> bool:
        return self.checkpoint is None
