"""What a set of shards holds, read from the tar headers alone: shards and samples, for the run's summary."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

# Beyond this many shards the sample count is estimated from the first ones: a header scan is
# cheap on a local disk but not free on a network file system.
COUNTED_SHARDS = 64


@dataclass(frozen=True)
class ShardInventory:
    shards: int
    samples: int | None  # None where a shard is not a local file (http, s3, pipe:)
    estimated: bool = False

    def describe(self) -> str:
        noun = "shard" if self.shards == 1 else "shards"
        if self.samples is None:
            return f"{self.shards} {noun}"
        about = "about " if self.estimated else ""
        return f"{self.shards} {noun}, {about}{self.samples} samples"


def samples_in_shard(path: str | Path) -> int:
    """Samples (distinct WebDataset keys: the member name up to the first dot of its file name) in a tar."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                folder, _, name = member.name.rpartition("/")
                keys.add((folder, name.split(".", 1)[0]))
    return len(keys)


def inventory(paths: list[str]) -> ShardInventory:
    """Shard and sample counts of ``paths`` (expanded shard URLs, as :class:`~vlm.data.datamodule.ShardDataModule`
    holds them); samples only where every shard is a readable local file."""
    if not paths or any(not Path(p).is_file() for p in paths):
        return ShardInventory(len(paths), None)
    counted = paths[:COUNTED_SHARDS]
    try:
        samples = sum(samples_in_shard(p) for p in counted)
    except (OSError, tarfile.TarError):
        return ShardInventory(len(paths), None)
    if len(counted) == len(paths):
        return ShardInventory(len(paths), samples)
    return ShardInventory(len(paths), round(samples * len(paths) / len(counted)), estimated=True)
