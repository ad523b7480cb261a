"""The in-memory sample record and the normalisation of conversations.

Everything that reads or writes training data (the demo renderer, the converter,
the shard reader) meets here: a :class:`Sample` is one training example, and
:func:`normalize_conversation` / :func:`align_placeholders` turn the several
conversation dialects found in the wild into the one form the rest of the code
expects.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"

# Skip reasons shared by the converter and the streaming reader, so that their
# summaries use the same words.
REASON_BAD_JSON = "bad json"
REASON_BAD_RECORD = "bad record"
REASON_BAD_CONVERSATION = "bad conversation"  # not a list of turns, a turn without a string content
REASON_EMPTY_CONVERSATION = "empty conversation"
REASON_NO_ASSISTANT_TURN = "no assistant turn"  # nothing to learn from
REASON_UNKNOWN_ROLE = "unknown role"
REASON_PLACEHOLDER_MISMATCH = "placeholder mismatch"
REASON_MISSING_IMAGE = "missing image"  # an image the sample names or has a placeholder for is not in the shard
REASON_MISSING_IMAGE_FILE = "missing image file"  # converter: the image path does not exist
REASON_NO_IMAGE_FOLDER = "relative image path without --images"  # converter: nothing to resolve it against
REASON_UNKNOWN_CONTENT_TYPE = "unknown content type"  # converter: a content item neither text nor image
REASON_UNREADABLE_IMAGE = "unreadable image"  # corrupt, truncated, or a mode that has no RGB
REASON_IMAGE_TOO_LARGE = "image too large"  # over PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS
# Shard-level reasons count once per shard and pass, not per sample.
REASON_UNREADABLE_SHARD = "unreadable shard"  # cannot be opened, or is not a tar at all
REASON_TRUNCATED_SHARD = "truncated shard"  # ends before its end-of-archive marker; the samples before the cut are kept

# Every role spelling we accept, mapped to the canonical OpenAI-style role
# (ShareGPT/LLaVA say "human"/"gpt", OpenAI says "user"/"assistant").
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

# The inverse, for writing the ShareGPT-style conversations stored in shards.
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


class DataError(ValueError):
    """The data of a run cannot be used: a pass over its shards gave no usable sample, or too many
    were skipped (``data.max_skip_fraction``). The message names the shards, a few skipped samples
    with their reasons, the counts per reason and what to do.

    Takes only a message, so a DataLoader worker can re-raise it in the main process unchanged.
    """


class RecordError(ValueError):
    """A record that cannot become a :class:`Sample`.

    ``reason`` is a short, stable category (one of the ``REASON_*`` constants) used to
    count skips; the message says what exactly is wrong and names the record.
    """

    def __init__(self, message: str, reason: str = REASON_BAD_RECORD):
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    """One training example.

    Attributes:
        key: Unique name of the sample within its shard (no dots: webdataset splits
            file names at the first dot).
        images: RGB images, in the order their placeholders appear in ``messages``.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}]``; the contents
            hold exactly one :data:`IMAGE_PLACEHOLDER` per image, in order, and there is
            at least one assistant turn.
        url: The shard the sample was read from (``None`` where it was not read from one).
    """

    key: str
    images: list[Image.Image]
    messages: list[dict[str, str]]
    url: str | None = field(default=None, compare=False)  # the shard it was read from, for messages

    def placeholder_count(self) -> int:
        """Number of :data:`IMAGE_PLACEHOLDER` occurrences over all messages."""
        return count_placeholders(self.messages)

    def validate(self) -> None:
        """Raise :class:`RecordError` unless the sample meets the documented invariants."""
        normalize_conversation(self.messages, key=self.key)
        if self.placeholder_count() != len(self.images):
            raise RecordError(
                f"sample {self.key!r}: {self.placeholder_count()} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"for {len(self.images)} image(s)",
                REASON_PLACEHOLDER_MISMATCH,
            )
        for i, image in enumerate(self.images):
            if not isinstance(image, Image.Image) or image.mode != "RGB":
                raise RecordError(f"sample {self.key!r}: image {i} is not an RGB PIL image", REASON_BAD_RECORD)


def _where(key: str | None) -> str:
    return f"record {key!r}: " if key is not None else ""


def normalize_conversation(conversations: list[dict], key: str | None = None) -> list[dict[str, str]]:
    """Turn a ShareGPT/LLaVA or OpenAI-style conversation into canonical messages.

    Args:
        conversations: turns as ``{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}``
            or ``{"role": ..., "content": str}`` (role names are case-insensitive).
        key: name of the record, only used in error messages.

    Returns:
        A new list of ``{"role": "system"|"user"|"assistant", "content": str}``; contents are
        passed through unchanged.

    Raises:
        RecordError (a ``ValueError``): reason ``"empty conversation"``, ``"unknown role"``, ``"no
        assistant turn"``, or ``"bad conversation"`` (not a list, a turn without role/content, a
        content that is not a string).
    """
    where = _where(key)
    if not isinstance(conversations, list):
        raise RecordError(
            f"{where}conversation must be a list of turns, got {type(conversations).__name__}",
            REASON_BAD_CONVERSATION,
        )
    if not conversations:
        raise RecordError(f"{where}conversation is empty", REASON_EMPTY_CONVERSATION)
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}turn {i} must be an object, got {type(turn).__name__}", REASON_BAD_CONVERSATION)
        if "from" in turn or "value" in turn:
            role, content = turn.get("from"), turn.get("value")
        elif "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            raise RecordError(
                f"{where}turn {i} has neither 'from'/'value' nor 'role'/'content' (keys: {sorted(turn)})",
                REASON_BAD_CONVERSATION,
            )
        canonical = _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if canonical is None:
            raise RecordError(
                f"{where}turn {i} has unknown role {role!r}; expected one of {sorted(_ROLE_ALIASES)}",
                REASON_UNKNOWN_ROLE,
            )
        if not isinstance(content, str):
            raise RecordError(
                f"{where}turn {i} ({canonical}) content must be a string, got {type(content).__name__}",
                REASON_BAD_CONVERSATION,
            )
        messages.append({"role": canonical, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"{where}conversation has no assistant turn", REASON_NO_ASSISTANT_TURN)
    return messages


def count_placeholders(messages: list[dict[str, str]]) -> int:
    """Number of :data:`IMAGE_PLACEHOLDER` occurrences over all message contents."""
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


def align_placeholders(messages: list[dict[str, str]], n_images: int, key: str | None = None) -> list[dict[str, str]]:
    """Make the placeholders in ``messages`` match ``n_images``.

    LLaVA-style data often carries an image but no ``<image>`` token; by that convention
    the image goes before the first user turn, so when there are images and no placeholder
    at all, one placeholder per image (each followed by a newline) is prepended to the first
    user turn. Otherwise the count must already be right.

    Args:
        messages: canonical messages (see :func:`normalize_conversation`); not modified.
        n_images: number of images the record carries.
        key: record name for error messages.

    Returns:
        The messages, as a new list when a placeholder was inserted.

    Raises:
        RecordError (reason ``"placeholder mismatch"``): the counts differ and cannot be fixed
        by the rule above (including images with no user turn to attach them to).
    """
    found = count_placeholders(messages)
    if found == n_images:
        return messages
    if found == 0:
        for i, message in enumerate(messages):
            if message["role"] == "user":
                fixed = list(messages)
                fixed[i] = {"role": "user", "content": (IMAGE_PLACEHOLDER + "\n") * n_images + message["content"]}
                return fixed
    raise RecordError(
        f"{_where(key)}{found} {IMAGE_PLACEHOLDER} placeholder(s) in the conversation for {n_images} image(s)",
        REASON_PLACEHOLDER_MISMATCH,
    )


def to_sharegpt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Canonical messages as ShareGPT turns (``{"from": "human"|"gpt"|"system", "value": ...}``)."""
    return [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]


@dataclass(frozen=True)
class SkippedSample:
    """One skipped sample or shard, kept as an example for messages: why, and where."""

    reason: str
    detail: str
    key: str | None = None  # None for a shard-level reason
    url: str | None = None

    def describe(self) -> str:
        """``sample 'k' in shard.tar: reason (detail)``, shortened to one readable line."""
        where = f"sample {self.key!r}" if self.key is not None else "shard"
        if self.url:
            where += f" in {self.url}" if self.key is not None else f" {self.url}"
        detail = self._detail_without_where()
        detail = detail if len(detail) <= _DETAIL_CHARS else detail[: _DETAIL_CHARS - 3] + "..."
        return f"{where}: {self.reason} ({detail})"

    def _detail_without_where(self) -> str:
        # Error messages name their sample and shard themselves; said once is enough.
        detail = self.detail
        if self.url:
            detail = detail.replace(f" (in {self.url})", "")
        if self.key is not None:
            for prefix in (f"sample {self.key!r}", f"record {self.key!r}"):
                if detail.startswith(prefix):
                    detail = detail[len(prefix) :].lstrip(",: ")
        return detail or self.detail


_DETAIL_CHARS = 300


class SkipCounter:
    """Counts skipped records per reason, keeps the first of each reason as an example, and warns
    once per reason.

    One counter belongs to one process: a DataLoader worker gets its own copy, so counts made
    inside workers reach the parent only as :meth:`unreported` hands them on (the data module
    sends them with the batches).
    """

    def __init__(self, logger: logging.Logger | None = None):
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, SkippedSample] = {}
        self._reported: Counter[str] = Counter()
        self._examples_reported = 0
        self._logger = logger or logging.getLogger(__name__)

    def add(self, reason: str, detail: Any = None, *, key: str | None = None, url: str | None = None) -> None:
        """Count one skip for ``reason`` of sample ``key`` in shard ``url``; the first one per reason
        is logged with ``detail`` and kept as an example."""
        if reason not in self._counts:
            self._logger.warning(
                "skipping bad data (%s): %s (further '%s' skips are counted, not logged)", reason, detail, reason
            )
            self._examples[reason] = SkippedSample(reason, str(detail), key, url)
        self._counts[reason] += 1

    @property
    def total(self) -> int:
        """All skips, over every reason."""
        return sum(self._counts.values())

    @property
    def pending(self) -> int:
        """Skips counted since the last :meth:`unreported`."""
        return self.total - sum(self._reported.values())

    def as_dict(self) -> dict[str, int]:
        """Skips per reason, most frequent first."""
        return dict(self._counts.most_common())

    @property
    def examples(self) -> list[SkippedSample]:
        """The first skip of each reason, in the order the reasons first came up."""
        return list(self._examples.values())

    def unreported(self) -> tuple[dict[str, int], list[SkippedSample]]:
        """The skips per reason and the new examples since the previous call (all of them, the first time)."""
        counts = self._counts - self._reported
        self._reported = Counter(self._counts)
        examples = self.examples[self._examples_reported :]
        self._examples_reported = len(self._examples)
        return dict(counts), examples

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
