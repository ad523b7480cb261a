"""Which model a run trains: the ``model`` config group becomes a :class:`ModelSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from .families import FAMILIES

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint and how to load it.

    ``checkpoint`` is a local directory or a Hub name; ``None`` builds the family's tiny variant
    into ``tiny_dir`` and loads it from there, through the same ``from_pretrained`` path.
    """

    family: str
    checkpoint: str | None = None
    tiny_dir: str | None = None
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not a supported family; known: {', '.join(sorted(FAMILIES))}")
        if self.checkpoint is None and not self.tiny_dir:
            raise ValueError("model.checkpoint is null and model.tiny_dir is not set: give a checkpoint or a tiny_dir")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attn_implementation={self.attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )

    @property
    def is_tiny(self) -> bool:
        return self.checkpoint is None
