"""Writing and reading the tar shard format.

A shard is a plain tar file as written by ``webdataset.TarWriter``. Per sample it holds

* ``KEY.json`` -- ``{"conversations": [ShareGPT turns], "images": ["0.png", "1.png"]}``
* its images: ``KEY.png`` (or ``.jpg``/``.jpeg``/``.webp``) for a single image, or
  ``KEY.0.png``, ``KEY.1.jpg``, ... for several (webdataset splits names at the first dot,
  so ``0.png`` is the "extension"); each entry holds an image file's bytes in the format its
  extension names. The reader honours a JPEG's EXIF orientation, so photos can be stored as
  they came from the camera.

``images`` lists the image extensions in placeholder order; when it is absent the reader takes
every image entry, sorted by extension name in natural numeric order. Keys therefore must not
contain a dot.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from PIL import Image, ImageOps
from webdataset.tariterators import base_plus_ext

from vlm.data.images import decode_rgb, opened_image, to_rgb
from vlm.data.records import (
    IMAGE_PLACEHOLDER,
    REASON_BAD_JSON,
    REASON_BAD_RECORD,
    REASON_MISSING_IMAGE,
    REASON_PLACEHOLDER_MISMATCH,
    REASON_TRUNCATED_SHARD,
    REASON_UNREADABLE_SHARD,
    RecordError,
    Sample,
    align_placeholders,
    count_placeholders,
    normalize_conversation,
    to_sharegpt,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# PIL formats whose files the reader takes as they are, and the extension they are stored under
# (MPO is a JPEG with extra frames, as many cameras write them).
_STORED_EXTENSION = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp"}
# A fixed modification time makes shards byte-for-byte reproducible from the same samples.
_TAR_MTIME = 0


# ---------------------------------------------------------------------------------------------
# writing


def encode_image(image: Image.Image, image_format: str = "png") -> bytes:
    """Encode a PIL image as ``png``, ``jpg``/``jpeg`` or ``webp`` bytes, made RGB first (see
    :func:`~vlm.data.images.to_rgb`: transparency on white, 16 bits scaled to 8)."""
    fmt = _PIL_FORMAT.get(image_format.lower())
    if fmt is None:
        raise ValueError(f"unsupported image format {image_format!r}; use one of {IMAGE_EXTENSIONS}")
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    to_rgb(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageFile:
    """An image as a shard stores it: file bytes, and the extension of their format (see :data:`IMAGE_EXTENSIONS`)."""

    data: bytes
    extension: str


def image_file(data: bytes, where: str) -> ImageFile:
    """Image file bytes as a shard stores them: unchanged when the reader takes their format
    (PNG, JPEG, WebP, found from the bytes themselves, not a file name), else re-encoded as PNG.

    The bytes are decoded in full first, so a corrupt or truncated image fails here.

    Raises:
        RecordError: reason "unreadable image" or "image too large" (over PIL's decompression-bomb
        limit); the message starts with ``where``.
    """
    with opened_image(data, where) as image:
        extension = _STORED_EXTENSION.get(image.format)
        if extension is not None:
            return ImageFile(data, extension)
        # Orientation is applied before re-encoding, since PNG does not carry EXIF here.
        return ImageFile(encode_image(ImageOps.exif_transpose(image), "png"), "png")


def check_key(key: str) -> None:
    """Raise ``ValueError`` if ``key`` cannot name a sample in a shard.

    A dot would move part of the key into the extension, a slash would create a directory
    entry, and ``__x__`` names are skipped by webdataset as metadata.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key or "/" in key or (key.startswith("__") and key.endswith("__")):
        raise ValueError(f"sample key {key!r} may not contain '.' or '/' or look like '__meta__'")


def encode_sample(sample: Sample, image_format: str = "png") -> dict[str, Any]:
    """Turn a :class:`Sample` into the dict ``webdataset.TarWriter`` writes (all values bytes),
    its images encoded as ``image_format``.

    Raises ``ValueError``/:class:`RecordError` naming the sample if it is not well formed.
    """
    check_key(sample.key)
    sample.validate()
    ext = image_format.lower()
    if ext not in _PIL_FORMAT:
        raise ValueError(f"unsupported image format {image_format!r}; use one of {IMAGE_EXTENSIONS}")
    files = [ImageFile(encode_image(image, ext), ext) for image in sample.images]
    return encode_record(sample.key, sample.messages, files)


def encode_record(key: str, messages: list[dict[str, str]], images: list[ImageFile]) -> dict[str, Any]:
    """The dict ``webdataset.TarWriter`` writes for a sample whose images are already files.

    Args:
        messages: canonical messages (see :func:`~vlm.data.records.normalize_conversation`) with
            one placeholder per image, in order.
        images: stored as they are, named by their extensions (``KEY.jpg``; ``KEY.0.jpg``,
            ``KEY.1.png``, ... for several).

    Raises ``ValueError``/:class:`RecordError` naming the sample if it is not well formed.
    """
    check_key(key)
    normalize_conversation(messages, key=key)
    placeholders = count_placeholders(messages)
    if placeholders != len(images):
        raise RecordError(
            f"sample {key!r}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)",
            REASON_PLACEHOLDER_MISMATCH,
        )
    unknown = sorted({image.extension for image in images} - set(IMAGE_EXTENSIONS))
    if unknown:
        raise ValueError(f"sample {key!r}: image extension(s) {unknown} are not among {IMAGE_EXTENSIONS}")
    if len(images) == 1:
        names = [images[0].extension]
    else:
        names = [f"{i}.{image.extension}" for i, image in enumerate(images)]
    meta = {"conversations": to_sharegpt(messages), "images": names}
    record: dict[str, Any] = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    record.update(zip(names, (image.data for image in images)))
    return record


class ShardSeries:
    """Writes records to ``out_dir/prefix-000000.tar``, ``prefix-000001.tar``, ... with at most
    ``per_shard`` each (records as :func:`encode_record` makes them).

    Each shard is written under a ``.partial`` name and renamed when complete, so a crash never
    leaves a truncated file that matches the shard pattern. As a context manager it closes the
    last shard on success and removes the partial one on an error; ``paths`` then lists the
    shards written, in order (empty when no record was written).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, per_shard: int):
        if per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be positive, got {per_shard}")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"shard prefix must be a plain file name prefix, got {prefix!r}")
        self.out_dir, self.prefix, self.per_shard = Path(out_dir), prefix, per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._count = 0
        self._keys: set[str] = set()

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None or self._count >= self.per_shard:
            self._finish()
            self._open()
        key = record["__key__"]
        if key in self._keys:
            # webdataset groups consecutive entries by key, so a repeated key would merge two samples.
            raise ValueError(f"duplicate sample key {key!r} in shard {self.paths[-1]}")
        self._keys.add(key)
        self._writer.write(record)
        self._count += 1

    def _open(self) -> None:
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self.paths.append(path)
        self._file = open(self._partial(path), "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
        self._count = 0
        self._keys = set()

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        os.replace(self._partial(self.paths[-1]), self.paths[-1])
        self._writer = self._file = None

    def abort(self) -> None:
        """Drop the shard being written (after an error)."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self._partial(self.paths.pop()).unlink(missing_ok=True)
        self._writer = self._file = None

    def close(self) -> list[Path]:
        """Finish the last shard; returns the paths of all shards written."""
        self._finish()
        _warn_about_stale_shards(self.out_dir, self.prefix, len(self.paths))
        return self.paths

    def __enter__(self) -> ShardSeries:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @staticmethod
    def _partial(path: Path) -> Path:
        return path.with_name(path.name + ".partial")


def write_shards(
    samples: Iterable[Sample],
    out_dir: Path,
    prefix: str,
    max_samples_per_shard: int,
    image_format: str = "png",
) -> list[Path]:
    """Write samples into tar shards ``out_dir/f"{prefix}-{i:06d}.tar"``.

    Args:
        samples: consumed lazily, one at a time (so a generator over a huge data set is fine).
        out_dir: created if missing.
        prefix: shard name prefix, e.g. ``"train"``.
        max_samples_per_shard: shard size limit (> 0).
        image_format: ``png`` (lossless, default), ``jpg``/``jpeg`` or ``webp``.

    Returns:
        Paths of the shards written, in order; empty when ``samples`` is empty.

    Raises:
        ValueError / RecordError: a sample is malformed (bad key, placeholder mismatch, duplicate
        key within a shard). Shards completed before the error are kept; the partial one is removed.
    """
    if image_format.lower() not in _PIL_FORMAT:
        raise ValueError(f"unsupported image format {image_format!r}; use one of {IMAGE_EXTENSIONS}")
    with ShardSeries(out_dir, prefix, max_samples_per_shard) as series:
        for sample in samples:
            series.write(encode_sample(sample, image_format))
    return series.paths


def _warn_about_stale_shards(out_dir: Path, prefix: str, n_written: int) -> None:
    # Shards left over from an earlier, larger run would be picked up by a glob (not by the
    # brace pattern we return); say so rather than deleting files we did not write.
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
    stale = sorted(p.name for p in out_dir.iterdir() if (m := pattern.match(p.name)) and int(m.group(1)) >= n_written)
    if stale:
        log.warning("%s holds %d older shard(s) not written by this run: %s", out_dir, len(stale), ", ".join(stale))


def shard_pattern(paths: Iterable[str | os.PathLike]) -> str:
    """A brace pattern webdataset expands back into ``paths``.

    ``[".../train-000000.tar", ..., ".../train-000003.tar"]`` becomes
    ``".../train-{000000..000003}.tar"``; a single path is returned as is; numbered paths that
    are not contiguous become a brace list ``{000000,000002}``.

    Raises ``ValueError`` for no paths, or paths that do not differ only in their shard number.
    """
    names = [os.fspath(p) for p in paths]
    if not names:
        raise ValueError("shard_pattern needs at least one path")
    if len(names) == 1:
        return names[0]
    parts = [re.match(r"^(.*\D)?(\d+)(\.[^/]*)$", name) for name in names]
    if not all(parts):
        raise ValueError(f"shard paths must end in a shard number and extension: {names}")
    heads = {(m.group(1) or "", m.group(3), len(m.group(2))) for m in parts}
    if len(heads) != 1:
        raise ValueError(f"shard paths differ in more than their shard number: {names}")
    head, tail, width = heads.pop()
    numbers = sorted(int(m.group(2)) for m in parts)
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"duplicate shard paths: {names}")
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        middle = f"{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}"
    else:
        middle = ",".join(f"{n:0{width}d}" for n in numbers)
    return f"{head}{{{middle}}}{tail}"


# ---------------------------------------------------------------------------------------------
# reading


def _natural_key(name: str) -> list:
    """Sort key putting ``2.png`` before ``10.png``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def image_entries(raw: dict[str, Any]) -> list[str]:
    """The image entries of a raw webdataset sample, in natural order of their extension names."""
    names = [k for k in raw if not k.startswith("__") and k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    return sorted(names, key=_natural_key)


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes (any format PIL reads) into an RGB PIL image, upright by its EXIF
    orientation (see :func:`vlm.data.images.decode_rgb`); :class:`RecordError` ("unreadable image",
    "image too large") if impossible."""
    return decode_rgb(data, where)


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Build a :class:`Sample` from a raw webdataset sample.

    Args:
        raw: ``{"__key__": str, "json": bytes, "png" | "0.png" | ...: bytes, ...}`` as produced
            by ``webdataset.tarfile_to_samples``; ``__url__`` (if present) is used in messages.

    Returns:
        The sample, with images decoded to RGB and placeholders aligned (a record with images but
        no placeholder gets them prepended to its first user turn), and its ``url``.

    Raises:
        RecordError: with ``reason`` "bad json", one of the conversation reasons (see
        :func:`~vlm.data.records.normalize_conversation`), "missing image" (listed but absent, or
        placeholders and no image at all), "unreadable image", "image too large" or "placeholder
        mismatch"; the message names the key and shard.
    """
    key = raw.get("__key__")
    url_note = f" (in {raw['__url__']})" if raw.get("__url__") else ""
    where = f"sample {key!r}{url_note}"
    if not isinstance(key, str) or not key:
        raise RecordError(f"{where}: no __key__", REASON_BAD_RECORD)
    if raw.get("__duplicates__"):
        # Which of two files with the same name is meant cannot be told.
        raise RecordError(f"{where}: the shard holds {raw['__duplicates__']} twice", REASON_BAD_RECORD)
    if "json" not in raw:
        raise RecordError(f"{where}: no {key}.json entry", REASON_BAD_JSON)
    try:
        text = raw["json"]
        meta = json.loads(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{where}: {key}.json is not valid JSON ({exc})", REASON_BAD_JSON) from exc
    if not isinstance(meta, dict) or "conversations" not in meta:
        raise RecordError(f"{where}: {key}.json must be an object with 'conversations'", REASON_BAD_JSON)

    try:
        messages = normalize_conversation(meta["conversations"], key=key)
    except RecordError as exc:
        raise RecordError(f"{exc}{url_note}", exc.reason) from exc

    listed = meta.get("images")
    if listed is None:
        names = image_entries(raw)
    elif isinstance(listed, list) and all(isinstance(n, str) for n in listed):
        names = [n.lower() for n in listed]  # webdataset lower-cases extensions when grouping
        missing = [n for n in names if n not in raw]
        if missing:
            raise RecordError(
                f"{where}: images {missing} listed in {key}.json are not in the shard", REASON_MISSING_IMAGE
            )
    else:
        raise RecordError(f"{where}: 'images' in {key}.json must be a list of extension names", REASON_BAD_JSON)

    if not names and count_placeholders(messages):
        # Placeholders and not one image entry: the image files were lost, not miscounted.
        raise RecordError(
            f"{where}: {count_placeholders(messages)} {IMAGE_PLACEHOLDER} placeholder(s) but no image in the shard",
            REASON_MISSING_IMAGE,
        )
    # Align before decoding: a mismatch is cheaper to find than a decoded image.
    try:
        messages = align_placeholders(messages, len(names), key=key)
    except RecordError as exc:
        raise RecordError(f"{exc}{url_note}", exc.reason) from exc
    images = [decode_image(raw[name], f"{where}, image {key}.{name}") for name in names]
    return Sample(key=key, images=images, messages=messages, url=raw.get("__url__"))


# ---------------------------------------------------------------------------------------------
# reading tar members


class ShardError(RecordError):
    """A shard that cannot be read to its end: reason "unreadable shard" (nothing could be read:
    not a tar, not there) or "truncated shard" (it stops before its end-of-archive marker)."""


# Member names webdataset leaves out of samples: ``__key__``-style metadata.
_META_NAME = re.compile(r"__[^/]*__($|/)")
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _EndAwareTarInfo(tarfile.TarInfo):
    """A TarInfo that marks its TarFile once the end-of-archive marker (a zero block) is read.

    tarfile ends an iteration silently both at that marker and where a cut file runs out at or
    inside a member header, so the marker is the one way to tell a complete archive from a cut one.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_.end_marker_seen = True
            raise


def tar_members(stream: IO[bytes], url: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file in the tar (optionally compressed) ``stream``, in
    order, without webdataset's ``__meta__`` entries.

    Raises:
        ShardError: "unreadable shard" when not even the first header reads (not a tar, an empty
        file), "truncated shard" when the archive stops before its end-of-archive marker (the
        members before the cut have been yielded by then). Messages name ``url``.
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)  # noqa: SIM115 - closed below
    except _READ_ERRORS as exc:
        raise ShardError(f"shard {url} is not a readable tar file ({exc})", REASON_UNREADABLE_SHARD) from exc
    tar.end_marker_seen = False
    read = 0
    with tar:  # closes tarfile's reader, not ``stream``
        try:
            for member in tar:
                if not member.isreg() or _META_NAME.match(member.name):
                    continue
                data = tar.extractfile(member).read()
                read += 1
                yield member.name, data
        except _READ_ERRORS as exc:
            raise ShardError(
                f"shard {url} stops after {read} file(s): it is truncated or corrupt ({exc})", REASON_TRUNCATED_SHARD
            ) from exc
    if not tar.end_marker_seen:
        raise ShardError(
            f"shard {url} ends after {read} file(s) without the tar end-of-archive marker: it is truncated",
            REASON_TRUNCATED_SHARD,
        )


def read_samples(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard, grouped as ``webdataset.tarfile_to_samples`` groups them:
    ``{"__key__": "dir/KEY", "__url__": url, "json": bytes, "png": bytes, ...}``, extensions
    lower-cased; a sample with two files of one extension also gets ``"__duplicates__"`` (their names).

    Raises:
        ShardError: see :func:`tar_members`. A truncated shard's samples before the cut have been
        yielded by then; the sample being read at the cut is not, since it may be missing files.
    """
    for group in whole_sample_members(tar_members(stream, url)):
        yield _raw_sample(group, url)


def whole_sample_members(members: Iterable[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    """The members of a tar grouped by sample key (as webdataset groups them: the name up to the
    first dot of its file name; names without a dot are left out), each group only once the next
    one starts or the archive ended whole.

    A :class:`ShardError` from ``members`` propagates without the group being read at the time:
    at a cut, the last sample may be missing files, so it goes with the shard's truncation.
    """
    group: list[tuple[str, bytes]] = []
    group_key: str | None = None
    for name, data in members:
        key, _ = base_plus_ext(name)
        if key is None:
            continue
        if group and key != group_key:
            yield group
            group = []
        group_key = key
        group.append((name, data))
    if group:
        yield group


def _raw_sample(group: list[tuple[str, bytes]], url: str) -> dict[str, Any]:
    raw: dict[str, Any] = {"__key__": base_plus_ext(group[0][0])[0], "__url__": url}
    for name, data in group:
        extension = base_plus_ext(name)[1].lower()
        if extension in raw:
            raw.setdefault("__duplicates__", []).append(name)
            continue
        raw[extension] = data
    return raw
