"""Convert the records researchers have, and their images, into tar shards.

``--input`` is a JSON array or JSONL file of records, or a Hugging Face dataset on disk (a
``save_to_disk`` folder, parquet or arrow files; see :mod:`vlm.data.hf_datasets`). A record is in
one of the formats of :mod:`vlm.data.formats`, told apart per record or named with ``--format``;
LLaVA/ShareGPT, for instance::

    {"id": "000123", "image": "coco/train2017/000123.jpg",     # or a list, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Image paths are relative to the image folder (absolute paths and ``file://`` URLs are used as
they are); images may also be embedded as bytes. Text-only records are kept. A record that cannot
be converted is skipped and counted by reason; only an input that cannot be read stops the
conversion.

Images go into the shards byte for byte when the reader takes their format (PNG, JPEG, WebP;
recognised from the content, not the file name), after checking that they decode; other formats
are re-encoded as PNG. A :class:`ValidationSplit` sends a seeded, reproducible choice of records
to ``val-*.tar`` shards beside the training ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vlm.data.formats import ImageSource, RecordLayout, parse_record
from vlm.data.hf_datasets import DatasetInputError, is_dataset_input, read_dataset
from vlm.data.images import decode_rgb
from vlm.data.records import (
    REASON_BAD_JSON,
    REASON_BAD_RECORD,
    REASON_MISSING_IMAGE_FILE,
    REASON_NO_IMAGE_FOLDER,
    REASON_UNREADABLE_IMAGE,
    RecordError,
    SkipCounter,
)
from vlm.data.shards import (
    ImageFile,
    ShardSeries,
    check_key,
    encode_image,
    encode_record,
    image_file,
    shard_pattern,
)

_MAX_KEY_LENGTH = 80
VAL_PREFIX = "val"


class InputFileError(Exception):
    """The input as a whole cannot be read (missing, not UTF-8, not a JSON array / JSONL, not a
    dataset, or without the split or column asked for)."""


@dataclass
class ConversionReport:
    """What a conversion did: samples written (train and val together; ``val_written`` of them to
    val shards), skips per reason, shard paths (``shards`` for training, ``val_shards``)."""

    written: int = 0
    val_written: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)
    shards: list[Path] = field(default_factory=list)
    val_shards: list[Path] = field(default_factory=list)

    @property
    def train_written(self) -> int:
        """Samples written to training shards."""
        return self.written - self.val_written

    @property
    def pattern(self) -> str | None:
        """Brace pattern of the training shards written, or ``None`` when none was written."""
        return shard_pattern(self.shards) if self.shards else None

    @property
    def val_pattern(self) -> str | None:
        """Brace pattern of the validation shards written, or ``None`` when none was written."""
        return shard_pattern(self.val_shards) if self.val_shards else None


@dataclass(frozen=True)
class ValidationSplit:
    """Which input records go to validation shards: ``count`` of them, or ``fraction`` of all.

    A fraction of ``n`` records is ``fraction * n`` rounded half up, and at least one. Records are
    ranked by the SHA-256 of ``"{seed}:{position}"`` (position: 0-based place in the input file)
    and the first ones go to validation, so the same input, size and seed give the same split on
    every run, machine and Python version, whichever records turn out to be bad (a bad record
    is skipped in the split it was chosen for, so a split may get fewer samples than records).
    Errors name the ``vlm-shards convert`` flags.
    """

    fraction: float | None = None
    count: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of --val-fraction and --val-count")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"--val-fraction {self.fraction} must be between 0 and 1, both excluded")
        if self.count is not None and self.count < 1:
            raise ValueError(f"--val-count {self.count} must be a positive integer")

    def size(self, n_records: int) -> int:
        """How many of ``n_records`` input records go to validation.

        Raises ``ValueError`` (naming the flag) when that would leave none for training.
        """
        if self.count is not None:
            size, flag = self.count, f"--val-count {self.count}"
        else:
            size, flag = max(1, math.floor(self.fraction * n_records + 0.5)), f"--val-fraction {self.fraction}"
        if size >= n_records:
            raise ValueError(f"{flag} leaves no record for training: the input holds {n_records}")
        return size

    def positions(self, n_records: int) -> frozenset[int]:
        """The 0-based input positions of the records that go to validation."""
        ranked = sorted(range(n_records), key=self._rank)
        return frozenset(ranked[: self.size(n_records)])

    def _rank(self, position: int) -> bytes:
        # Not hash(): that is salted per process for strings, and not random: its shuffles may
        # change between Python versions.
        return hashlib.sha256(f"{self.seed}:{position}".encode()).digest()


@dataclass
class RawRecord:
    """One entry of the input file: its 0-based position and parsed JSON, or why it could not be parsed."""

    index: int
    data: Any = None
    error: RecordError | None = None


def read_records(input_path: str | Path) -> tuple[int, Iterator[RawRecord]]:
    """Open a JSON array or JSONL file of records.

    The format is taken from the content, not the file name: a file whose first non-blank
    character is ``[`` is one JSON array, anything else is JSONL (one record per non-blank line;
    a line that does not parse becomes a ``RawRecord`` with an error, not a failure).

    Returns:
        ``(number of records, iterator over them)``.

    Raises:
        InputFileError: the file is missing or unreadable, not UTF-8, or not a valid JSON array.
    """
    path = Path(input_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read input file {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path} is not valid JSON: {exc}") from exc
        return len(records), (RawRecord(i, r) for i, r in enumerate(records))
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise InputFileError(f"{path} holds no records")

    def parse() -> Iterator[RawRecord]:
        for index, (line_no, line) in enumerate(lines):
            try:
                yield RawRecord(index, json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawRecord(index, error=RecordError(f"{path}:{line_no}: invalid JSON ({exc})", REASON_BAD_JSON))

    return len(lines), parse()


@dataclass
class InputRecords:
    """The records of an input, how many there are, and the layout to read them with."""

    total: int
    records: Iterator[RawRecord]
    layout: RecordLayout


def open_input(input_path: str | Path, layout: RecordLayout | None = None, split: str | None = None) -> InputRecords:
    """Open a JSON/JSONL file (see :func:`read_records`) or a dataset (see :func:`~vlm.data.hf_datasets.read_dataset`).

    ``layout`` (default: formats told per record, fields found per record) says how to read the
    records; for a dataset, its fields become the columns read.

    Raises:
        InputFileError: the input cannot be read, has no such split or column, or ``split`` is
        given for a JSON file.
    """
    layout = layout or RecordLayout()
    if not is_dataset_input(input_path):
        if split is not None:
            raise InputFileError(f"--split picks a split of a dataset, and {input_path} is read as JSON or JSONL")
        total, records = read_records(input_path)
        return InputRecords(total, records, layout)
    try:
        found = read_dataset(input_path, split, layout.messages_field, layout.images_field)
    except DatasetInputError as exc:
        raise InputFileError(str(exc)) from exc
    records = (RawRecord(index, row) for index, row in enumerate(found.rows))
    columns = replace(layout, messages_field=found.messages_column, images_field=found.images_column)
    return InputRecords(found.total, records, columns)


class KeyAssigner:
    """Gives each record a unique shard key derived from its ``id`` (dots etc. replaced by ``_``)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, record: dict[str, Any], index: int) -> str:
        raw_id = record.get("id")
        key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(raw_id))[:_MAX_KEY_LENGTH] if raw_id not in (None, "") else ""
        try:
            check_key(key)
        except ValueError:
            key = f"record{index:09d}"
        while key in self._seen:
            key = f"{key}-{index}"  # ids repeat in some data sets; the position makes them unique
        self._seen.add(key)
        return key


def _image_bytes(path: Path, where: str) -> bytes:
    """The bytes of an image file; ``RecordError`` "missing image file" or "unreadable image"."""
    if not path.is_file():
        raise RecordError(f"{where}: image file {path} does not exist", REASON_MISSING_IMAGE_FILE)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RecordError(f"{where}: cannot read image {path} ({exc})", REASON_UNREADABLE_IMAGE) from exc


def _source_bytes(source: ImageSource, images_dir: str | Path | None, where: str) -> bytes:
    if source.data is not None:
        return source.data
    path = Path(source.path)
    if not path.is_absolute():
        if images_dir is None:
            raise RecordError(
                f"{where}: {source.field} is a relative path ({source.path!r}) and no --images folder was given",
                REASON_NO_IMAGE_FOLDER,
            )
        path = Path(images_dir) / path
    return _image_bytes(path, f"{where}: {source.field}")


def read_image(
    source: ImageSource, images_dir: str | Path | None, where: str, image_format: str | None = None
) -> ImageFile:
    """The image ``source`` names (embedded bytes, or a file found in ``images_dir``) as a shard stores it.

    Args:
        image_format: ``None`` keeps the image's own bytes when its format is PNG, JPEG or WebP
            (other formats become PNG); ``png``, ``jpg``/``jpeg`` or ``webp`` re-encodes it.

    Raises:
        RecordError: reason "missing image file", "relative image path without --images",
        "unreadable image" (it does not decode) or "image too large".
    """
    data = _source_bytes(source, images_dir, where)
    described = f"{where}: {source.describe()}"
    if image_format is not None:
        return ImageFile(encode_image(decode_rgb(data, described), image_format), image_format.lower())
    return image_file(data, described)


def record_to_entry(
    record: Any,
    images_dir: str | Path | None,
    key: str,
    image_format: str | None = None,
    layout: RecordLayout | None = None,
) -> dict[str, Any]:
    """Turn one parsed input record into the shard entry named ``key`` (what ``webdataset.TarWriter``
    writes; see :func:`~vlm.data.shards.encode_record`), its images as :func:`read_image` stores them.

    Raises:
        RecordError: reason "bad record" (not an object, bad image field), one of the conversation
        reasons (see :func:`~vlm.data.formats.parse_record`), "placeholder mismatch", or an image's
        (see :func:`read_image`).
    """
    where = f"record {key!r}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: must be a JSON object, got {type(record).__name__}", REASON_BAD_RECORD)
    parsed = parse_record(record, layout or RecordLayout(), key)
    images = [read_image(source, images_dir, where, image_format) for source in parsed.images]
    return encode_record(key, parsed.messages, images)


def convert(
    input_path: str | Path,
    images_dir: str | Path | None,
    out_dir: str | Path,
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    image_format: str | None = None,
    val_split: ValidationSplit | None = None,
    layout: RecordLayout | None = None,
    split: str | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> ConversionReport:
    """Convert the records of ``input_path`` (a JSON/JSONL file or a dataset) into shards ``out_dir/prefix-*.tar``.

    Args:
        images_dir: the folder relative image paths are found in; ``None`` when the records embed
            their images or give absolute paths (a record with a relative path is then skipped).
        image_format: ``None`` stores PNG, JPEG and WebP files as they are (others as PNG);
            ``png``, ``jpg`` or ``webp`` re-encodes every image (see :func:`read_image`).
        val_split: records chosen for validation go to ``out_dir/val-*.tar`` instead; ``None``
            writes training shards only.
        layout: the records' format and fields (see :class:`~vlm.data.formats.RecordLayout`;
            default: told per record).
        split: the split of a dataset to convert (see :func:`open_input`).
        progress: show a rich progress bar (on ``console``, stderr by default).

    Returns:
        A :class:`ConversionReport`; bad records are counted in ``report.skipped``, never raised.

    Raises:
        InputFileError: the input itself cannot be read (see :func:`open_input`).
        ValueError: ``prefix`` is that of the validation shards while splitting, or the split
            leaves no record for training.
    """
    if val_split is not None and prefix == VAL_PREFIX:
        raise ValueError(f"--prefix {prefix} names the validation shards; choose another prefix for training shards")
    source = open_input(input_path, layout, split)
    val_positions = val_split.positions(source.total) if val_split is not None else frozenset()
    report = ConversionReport()
    assign_key = KeyAssigner()
    bar = Progress(
        TextColumn("[bold]converting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("written {task.fields[written]}, skipped {task.fields[skipped]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not progress,
    )

    with bar, ExitStack() as shards:
        train = shards.enter_context(ShardSeries(out_dir, prefix, samples_per_shard))
        val = shards.enter_context(ShardSeries(out_dir, VAL_PREFIX, samples_per_shard)) if val_split else None
        task = bar.add_task("convert", total=source.total, written=0, skipped=0)
        for raw in source.records:
            try:
                entry = _raw_to_entry(raw, images_dir, assign_key, image_format, source.layout)
            except RecordError as exc:
                report.skipped.add(exc.reason, exc)
            else:
                to_val = raw.index in val_positions
                (val if to_val else train).write(entry)
                report.written += 1
                report.val_written += to_val
            bar.update(task, advance=1, written=report.written, skipped=report.skipped.total)
    report.shards = train.paths
    report.val_shards = val.paths if val is not None else []
    return report


def _raw_to_entry(
    raw: RawRecord,
    images_dir: str | Path | None,
    assign_key: KeyAssigner,
    image_format: str | None,
    layout: RecordLayout,
) -> dict:
    if raw.error is not None:
        raise raw.error
    key = assign_key(raw.data, raw.index) if isinstance(raw.data, dict) else f"record{raw.index:09d}"
    return record_to_entry(raw.data, images_dir, key, image_format, layout)
