"""Records from a Hugging Face dataset on disk, read through the ``datasets`` library.

A dataset is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict), or ``.parquet`` /
``.arrow`` files, one path or a glob. Rows are read in Arrow batches and turned into Python a batch
at a time, as they are stored: an image feature arrives as ``{"bytes": ..., "path": ...}``, never
decoded to PIL, so its bytes can go into the shards unchanged. Reading the stored values needs no
cast either; casting a list of images to ``Image(decode=False)`` would copy the whole dataset into
a cache file beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.data.formats import CONVERSATION_FIELDS, IMAGE_FIELDS

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
DEFAULT_SPLIT = "train"
# The column that names a row, when there is one (the converter makes shard keys of it).
KEY_COLUMN = "id"
# Rows per Arrow batch: a few Python calls per batch rather than per row, and no more images in
# memory at a time than a shard writer wants.
BATCH_SIZE = 64


class DatasetInputError(ValueError):
    """A dataset that cannot be read as asked: not a dataset, or no such split or column."""


@dataclass
class DatasetRows:
    """The rows of one split, each a dict of the columns read, and the names of those columns."""

    total: int
    rows: Iterator[dict[str, Any]]
    messages_column: str
    images_column: str | None


def is_dataset_input(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a dataset (a folder, or parquet / arrow files) rather than a JSON or JSONL file."""
    return Path(path).is_dir() or Path(path).suffix.lower() in DATA_FILE_BUILDERS


def read_dataset(
    path: str | os.PathLike,
    split: str | None = None,
    messages_column: str | None = None,
    images_column: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> DatasetRows:
    """Open one split of the dataset at ``path`` and read its rows lazily.

    Args:
        split: the split of a DatasetDict (default ``train``); for a single Dataset, ``None`` or its own split.
        messages_column: the conversation column (default: the first of ``conversations``, ``messages``
            and ``texts`` there is).
        images_column: the images column (default: ``image`` or ``images`` if there is one, else none).

    Raises:
        DatasetInputError: ``path`` is no dataset, or the split or a column is not there; the message
        names what is there and the flag that chooses it.
    """
    # Imported here: half a second of imports that a JSON conversion does without.
    import datasets

    where = os.fspath(path)
    dataset = _split(_load(datasets, where), split, where)
    columns = dataset.column_names
    messages = _column(columns, messages_column, CONVERSATION_FIELDS, "--messages-column", where)
    images = _column(columns, images_column, IMAGE_FIELDS, "--images-column", where, required=False)
    read = list(dict.fromkeys(c for c in (KEY_COLUMN, messages, images) if c in columns))
    batches = dataset.select_columns(read).with_format("arrow").iter(batch_size=batch_size)
    rows = (row for batch in batches for row in batch.to_pylist())
    return DatasetRows(len(dataset), rows, messages, images)


def _load(datasets: Any, path: str) -> Any:
    folder = Path(path).is_dir()
    try:
        if folder:
            return datasets.load_from_disk(path)
        return datasets.load_dataset(DATA_FILE_BUILDERS[Path(path).suffix.lower()], data_files=path)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        hint = " (a folder must be written by save_to_disk; name parquet or arrow files, or a glob of them)"
        raise DatasetInputError(f"cannot read the dataset {path}: {exc}{hint if folder else ''}") from exc


def _split(loaded: Any, split: str | None, path: str) -> Any:
    if not isinstance(loaded, dict):  # one Dataset; a DatasetDict is a dict of them
        own = str(loaded.split) if loaded.split is not None else None
        if split is not None and split != own:
            raise DatasetInputError(
                f"{path} holds a single dataset{f' (split {own!r})' if own else ''}, not split {split!r}: "
                "leave out --split"
            )
        return loaded
    name = split or DEFAULT_SPLIT
    if name not in loaded:
        raise DatasetInputError(
            f"{path} has no split {name!r}; its splits: {', '.join(loaded)} (pick one with --split)"
        )
    return loaded[name]


def _column(
    columns: list[str], asked: str | None, candidates: tuple[str, ...], flag: str, path: str, required: bool = True
) -> str | None:
    if asked is not None:
        if asked not in columns:
            raise DatasetInputError(f"{path} has no column {asked!r} ({flag}); its columns: {', '.join(columns)}")
        return asked
    found = next((name for name in candidates if name in columns), None)
    if found is None and required:
        raise DatasetInputError(
            f"{path} has none of the columns {', '.join(candidates)}; its columns: {', '.join(columns)} "
            f"(name the conversation's with {flag})"
        )
    return found
