"""The record formats researchers bring, parsed into canonical messages and the images they name.

A record is one JSON object or one dataset row. ``--format`` names its format, or ``auto`` tells
it from the conversation itself, record by record:

* ``sharegpt`` (LLaVA): ``{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, ...]}``;
* ``openai``: ``{"images": [...], "messages": [{"role": "user", "content": "<image>\\nWhat?"}, ...]}``;
* ``trl``: the content lists ``processor.apply_chat_template`` takes, ``{"images": [...], "messages":
  [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}, ...]}``; an
  image item may hold its own image (under ``image``, ``url`` or ``path``), else it takes the next
  one of ``images``;
* ``cauldron``: ``{"images": [...], "texts": [{"user": "What?", "assistant": "Red."}, ...]}``, the
  images before the first user turn.

``sharegpt`` and ``openai`` records are read alike: either turn spelling, string contents, and the
images before the first user turn when the text has no placeholder.

Each comes out as canonical messages (see :func:`~vlm.data.records.normalize_conversation`) with
one :data:`~vlm.data.records.IMAGE_PLACEHOLDER` where each image stood, and the images in that
order as :class:`ImageSource` s: a path or embedded bytes, not read yet. An image is a path
(relative to the image folder, or absolute), a ``file://`` URL, bytes, or a ``{"bytes", "path"}``
dict as the ``datasets`` library stores images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from vlm.data.records import (
    IMAGE_PLACEHOLDER,
    REASON_BAD_CONVERSATION,
    REASON_BAD_RECORD,
    REASON_MISSING_IMAGE,
    REASON_PLACEHOLDER_MISMATCH,
    REASON_UNKNOWN_CONTENT_TYPE,
    RecordError,
    align_placeholders,
    normalize_conversation,
)

RECORD_FORMATS = ("sharegpt", "openai", "trl", "cauldron")
FORMAT_CHOICES = ("auto", *RECORD_FORMATS)
# Where a record's conversation and images are when no field is named, in the order looked at.
CONVERSATION_FIELDS = ("conversations", "messages", "texts")
IMAGE_FIELDS = ("image", "images")
# The keys under which a content item of type "image" may hold its own image.
_ITEM_IMAGE_KEYS = ("image", "url", "path")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BYTES = (bytes, bytearray, memoryview)


@dataclass(frozen=True)
class RecordLayout:
    """How to read records: their format (one of :data:`FORMAT_CHOICES`), and the fields holding the
    conversation and the images (``None``: the first of :data:`CONVERSATION_FIELDS` /
    :data:`IMAGE_FIELDS` a record has)."""

    record_format: str = "auto"
    messages_field: str | None = None
    images_field: str | None = None

    def __post_init__(self) -> None:
        if self.record_format not in FORMAT_CHOICES:
            raise ValueError(f"--format {self.record_format!r} is not one of {', '.join(FORMAT_CHOICES)}")


@dataclass(frozen=True)
class ImageSource:
    """One image a record names. ``field`` says where (``images[1]``, ``messages[0].content[2].image``).

    ``data`` holds embedded bytes; without them the image is read from ``path`` (relative to the
    image folder unless absolute). With them, ``path`` is only the name the record gave it.
    """

    field: str
    path: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        """Where the image is in the record, and the name it was given there: ``images[0] (cat.jpg)``."""
        return f"{self.field} ({self.path})" if self.path else self.field


@dataclass(frozen=True)
class ParsedRecord:
    """A record's canonical messages, one placeholder per image, and its images in placeholder order."""

    messages: list[dict[str, str]]
    images: list[ImageSource]


def parse_record(record: dict[str, Any], layout: RecordLayout, key: str) -> ParsedRecord:
    """Parse one record (a dict) in ``layout``'s format; ``key`` names it in messages.

    Raises:
        RecordError: reason "bad conversation", "empty conversation", "unknown role", "no assistant
        turn", "unknown content type", "placeholder mismatch", "missing image" or "bad record";
        the message names the record and the field.
    """
    where = _where(key)
    field = _conversation_field(record, layout.messages_field, where)
    conversation = record[field]
    record_format = layout.record_format if layout.record_format != "auto" else detect_format(conversation)
    if record_format == "trl":
        parsed = _parse_content_lists(conversation, field, key)
    elif record_format == "cauldron":
        parsed = _ParsedTurns(_parse_exchanges(conversation, field, key))
    else:
        parsed = _ParsedTurns(normalize_conversation(conversation, key=key))
    images_field = layout.images_field or next(
        (name for name in IMAGE_FIELDS if not _empty(record.get(name))), IMAGE_FIELDS[-1]
    )
    listed = listed_images(record.get(images_field), images_field, where)
    # Checked before any image is read: it costs nothing.
    return _place_images(parsed, listed, images_field, key)


def detect_format(conversation: Any) -> str:
    """The format of a conversation: TRL when a turn's content is a list; otherwise by the keys of the
    first turn: ``from``/``value`` ShareGPT, ``role``/``content`` OpenAI, ``user``/``assistant`` a
    Cauldron exchange. ShareGPT when it cannot be told (its normalization then says what is wrong)."""
    turns = [turn for turn in conversation if isinstance(turn, dict)] if isinstance(conversation, list) else []
    if not turns:
        return "sharegpt"
    if any(isinstance(turn.get("content"), list) for turn in turns):
        return "trl"
    first = turns[0]
    if "from" in first or "value" in first:
        return "sharegpt"
    if "role" in first or "content" in first:
        return "openai"
    if "user" in first or "assistant" in first:
        return "cauldron"
    return "sharegpt"


def listed_images(value: Any, field: str, where: str = "") -> list[ImageSource]:
    """The images a record lists in ``field``: nothing, one image, or a list of them (see :func:`image_source`)."""
    if _empty(value):
        return []
    if isinstance(value, list):
        return [image_source(item, f"{field}[{i}]", where) for i, item in enumerate(value)]
    return [image_source(value, field, where)]


def image_source(value: Any, field: str, where: str = "") -> ImageSource:
    """One image as a record gives it: a path, a ``file://`` URL, bytes, or a ``{"bytes", "path"}`` dict.

    Raises:
        RecordError: reason "missing image" for a dict with neither bytes nor a path, "bad record"
        for anything else that is not an image (remote URLs included: they are not fetched).
    """
    if isinstance(value, _BYTES):
        return ImageSource(field, data=bytes(value))
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and _empty(path):
            raise RecordError(f"{where}{field} holds neither image bytes nor a path", REASON_MISSING_IMAGE)
        if data is None:
            return image_source(path, f"{field}.path", where)
        if not isinstance(data, _BYTES):
            raise RecordError(f"{where}{field}.bytes must be bytes, got {type(data).__name__}", REASON_BAD_RECORD)
        return ImageSource(field, path=path if isinstance(path, str) else None, data=bytes(data))
    if isinstance(value, str) and value:
        return ImageSource(field, path=_local_path(value, field, where))
    raise RecordError(
        f"{where}{field} must be an image path, a file:// URL, bytes or a {{'bytes', 'path'}} dict, "
        f"got {type(value).__name__}",
        REASON_BAD_RECORD,
    )


def _local_path(value: str, field: str, where: str) -> str:
    if value.startswith("file://"):
        url = urlparse(value)
        if url.netloc not in ("", "localhost"):
            raise RecordError(f"{where}{field}: {value!r} names a file on another host", REASON_BAD_RECORD)
        return unquote(url.path)
    if _URL_SCHEME.match(value):
        raise RecordError(
            f"{where}{field}: {value!r} is a remote URL; images are read from local files only (download them first)",
            REASON_BAD_RECORD,
        )
    return value


def _conversation_field(record: dict[str, Any], named: str | None, where: str) -> str:
    if named is not None:
        if named not in record:
            raise RecordError(f"{where}no {named!r} field (it has {sorted(record)})", REASON_BAD_CONVERSATION)
        return named
    found = next((name for name in CONVERSATION_FIELDS if name in record), None)
    if found is None:
        raise RecordError(
            f"{where}no conversation: none of the fields {list(CONVERSATION_FIELDS)} (it has {sorted(record)})",
            REASON_BAD_CONVERSATION,
        )
    return found


@dataclass(frozen=True)
class _ParsedTurns:
    """Canonical messages and, for content lists, what their image items hold."""

    messages: list[dict[str, str]]
    # One per image item, in order: the item's own image, or None for the next one the record lists.
    slots: tuple[ImageSource | None, ...] = ()
    literal: str | None = None  # the first text that spells out a placeholder itself


def _parse_content_lists(conversation: Any, field_name: str, key: str) -> _ParsedTurns:
    """TRL turns: text items joined as they are, each image item a placeholder where it stands."""
    where = _where(key)
    if not isinstance(conversation, list):
        normalize_conversation(conversation, key=key)  # raises, saying what it is instead
    turns: list[Any] = []
    slots: list[ImageSource | None] = []
    literal: str | None = None
    for i, turn in enumerate(conversation):
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(content, list):
            turns.append(turn)  # a string content, or no turn at all: normalization judges it
            if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
                literal = literal or f"{field_name}[{i}].content"
            continue
        pieces = []
        for j, item in enumerate(content):
            at = f"{field_name}[{i}].content[{j}]"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise RecordError(
                        f"{where}{at}: a text item needs a string 'text', got {type(text).__name__}",
                        REASON_BAD_CONVERSATION,
                    )
                if IMAGE_PLACEHOLDER in text:
                    literal = literal or at
                pieces.append(text)
            elif kind == "image":
                pieces.append(IMAGE_PLACEHOLDER)
                slots.append(_own_image(item, at, where))
            elif isinstance(item, dict):
                raise RecordError(
                    f"{where}{at}: unknown type {kind!r}; expected 'text' or 'image'", REASON_UNKNOWN_CONTENT_TYPE
                )
            else:
                raise RecordError(
                    f"{where}{at}: a content item must be an object, got {type(item).__name__}",
                    REASON_BAD_CONVERSATION,
                )
        # No separator: chat templates render the items of a content list back to back.
        turns.append({"role": turn.get("role"), "content": "".join(pieces)})
    return _ParsedTurns(normalize_conversation(turns, key=key), tuple(slots), literal)


def _place_images(parsed: _ParsedTurns, listed: list[ImageSource], images_field: str, key: str) -> ParsedRecord:
    """The record's images in placeholder order: image items take their own image or the next listed one."""
    where = _where(key)
    if not parsed.slots:
        # No image item: any placeholders are in the text, as in the string formats.
        return ParsedRecord(align_placeholders(parsed.messages, len(listed), key=key), listed)
    if parsed.literal is not None:
        raise RecordError(
            f"{where}{parsed.literal}: the text spells out {IMAGE_PLACEHOLDER} although the conversation has "
            "image items, so which image goes where cannot be told",
            REASON_PLACEHOLDER_MISMATCH,
        )
    wanted = parsed.slots.count(None)
    if wanted != len(listed):
        raise RecordError(
            f"{where}{wanted} image item(s) without an image of their own for {len(listed)} image(s) in "
            f"{images_field!r}",
            REASON_PLACEHOLDER_MISMATCH,
        )
    remaining = iter(listed)
    return ParsedRecord(parsed.messages, [slot or next(remaining) for slot in parsed.slots])


def _own_image(item: dict[str, Any], at: str, where: str) -> ImageSource | None:
    for name in _ITEM_IMAGE_KEYS:
        if not _empty(item.get(name)):
            return image_source(item[name], f"{at}.{name}", where)
    return None


def _parse_exchanges(texts: Any, field: str, key: str) -> list[dict[str, str]]:
    """Cauldron exchanges, each a user turn and the assistant's answer."""
    where = _where(key)
    if not isinstance(texts, list):
        raise RecordError(
            f"{where}{field} must be a list of {{'user', 'assistant'}} exchanges, got {type(texts).__name__}",
            REASON_BAD_CONVERSATION,
        )
    turns = []
    for i, exchange in enumerate(texts):
        if not isinstance(exchange, dict):
            raise RecordError(
                f"{where}{field}[{i}] must be an object with 'user' and 'assistant', got {type(exchange).__name__}",
                REASON_BAD_CONVERSATION,
            )
        for role in ("user", "assistant"):
            text = exchange.get(role)
            if not isinstance(text, str):
                raise RecordError(
                    f"{where}{field}[{i}].{role} must be a string, got {type(text).__name__}", REASON_BAD_CONVERSATION
                )
            turns.append({"role": role, "content": text})
    return normalize_conversation(turns, key=key)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and not value)


def _where(key: str | None) -> str:
    return f"record {key!r}: " if key is not None else ""
