"""Convert ShareGPT/LLaVA-format JSON or JSONL plus an image folder into tar shards.

Input records look like::

    {"id": "000123", "image": "coco/train2017/000123.jpg",     # or a list, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

``images`` (a list) is accepted instead of ``image`` and ``messages`` (OpenAI-style turns)
instead of ``conversations``. Image paths are relative to the image folder (absolute paths are
used as they are). Text-only records are kept. A record that cannot be converted is skipped and
counted by reason; only an unreadable input file stops the conversion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlm.data.records import (
    REASON_BAD_JSON,
    REASON_BAD_RECORD,
    REASON_MISSING_IMAGE_FILE,
    REASON_UNREADABLE_IMAGE,
    RecordError,
    Sample,
    SkipCounter,
    align_placeholders,
    normalize_conversation,
)
from vlm.data.shards import check_key, shard_pattern, write_shards

_MAX_KEY_LENGTH = 80


class InputFileError(Exception):
    """The input file as a whole cannot be read (missing, not UTF-8, not a JSON array / JSONL)."""


@dataclass
class ConversionReport:
    """What a conversion did: samples written, skips per reason, shard paths."""

    written: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)
    shards: list[Path] = field(default_factory=list)

    @property
    def pattern(self) -> str | None:
        """Brace pattern of the shards written, or ``None`` when nothing was written."""
        return shard_pattern(self.shards) if self.shards else None


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


def _image_paths(record: dict[str, Any], where: str) -> list[str]:
    value = record.get("image", record.get("images"))
    if value is None or value == [] or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return value
    raise RecordError(f"{where}: 'image' must be a path or a list of paths, got {value!r}", REASON_BAD_RECORD)


def load_image(path: Path, where: str) -> Image.Image:
    """Read an image file as RGB, honouring its EXIF orientation."""
    if not path.is_file():
        raise RecordError(f"{where}: image file {path} does not exist", REASON_MISSING_IMAGE_FILE)
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:  # PIL raises many exception types for corrupt files
        raise RecordError(f"{where}: cannot read image {path} ({exc})", REASON_UNREADABLE_IMAGE) from exc


def record_to_sample(record: Any, images_dir: str | Path, key: str) -> Sample:
    """Turn one parsed input record into a :class:`Sample` named ``key``.

    Raises:
        RecordError: reason "bad record" (not an object, bad image field), "bad conversation",
        "placeholder mismatch", "missing image file" or "unreadable image".
    """
    where = f"record {key!r}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: must be a JSON object, got {type(record).__name__}", REASON_BAD_RECORD)
    conversation = record.get("conversations", record.get("messages"))
    messages = normalize_conversation(conversation, key=key)
    paths = _image_paths(record, where)
    # Check the placeholders before reading any image: it costs nothing.
    messages = align_placeholders(messages, len(paths), key=key)
    images = [load_image(Path(images_dir) / p, where) for p in paths]
    return Sample(key=key, images=images, messages=messages)


def convert(
    input_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    image_format: str = "png",
    progress: bool = True,
    console: Console | None = None,
) -> ConversionReport:
    """Convert a JSON/JSONL file of LLaVA/ShareGPT records into shards ``out_dir/prefix-*.tar``.

    Args:
        progress: show a rich progress bar (on ``console``, stderr by default).

    Returns:
        A :class:`ConversionReport`; bad records are counted in ``report.skipped``, never raised.

    Raises:
        InputFileError: the input file itself is unreadable (see :func:`read_records`).
    """
    total, records = read_records(input_path)
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

    def samples() -> Iterator[Sample]:
        task = bar.add_task("convert", total=total, written=0, skipped=0)
        for raw in records:
            try:
                if raw.error is not None:
                    raise raw.error
                key = assign_key(raw.data, raw.index) if isinstance(raw.data, dict) else f"record{raw.index:09d}"
                sample = record_to_sample(raw.data, images_dir, key)
            except RecordError as exc:
                report.skipped.add(exc.reason, exc)
                sample = None
            else:
                report.written += 1
            bar.update(task, advance=1, written=report.written, skipped=report.skipped.total)
            if sample is not None:
                yield sample

    with bar:
        report.shards = write_shards(samples(), Path(out_dir), prefix, samples_per_shard, image_format)
    return report
