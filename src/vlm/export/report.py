"""What an export wrote, and the errors that stop one before it writes anything wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlm.errors import ConfigError

FORMS = ("adapter", "merged", "vllm")


class ExportError(ConfigError):
    """An export that cannot be done as asked; the message names the problem and what to do instead."""


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class ExportReport:
    """``form``: one of :data:`FORMS`; ``lora_layers``/``lora_tensors``: the adapter's layers and
    matrices that were merged (``merged``) or written (``adapter``, ``vllm``)."""

    form: str
    out_dir: Path
    lora_layers: int
    lora_tensors: int
    files: tuple[WrittenFile, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


def written_files(out_dir: Path) -> tuple[WrittenFile, ...]:
    """Every file under ``out_dir``, by path, with its size."""
    return tuple(WrittenFile(p, p.stat().st_size) for p in sorted(out_dir.rglob("*")) if p.is_file())


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a path; :class:`ExportError` when it is a file or already holds files.

    An export never writes over another: stale shards of an earlier one would load with it.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"--out {out_dir} is not empty: export into a new or empty directory")
    return out_dir


def prepare_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` checked (:func:`check_out_dir`) and created."""
    out_dir = check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir
