"""One conversation sample → the model's input tensors, with labels on the assistant's tokens only.

The encoder is generic over model families: it relies only on the processor's chat template, its
(fast) tokenizer and its ``__call__``, and on the family's image token. The steps:

1. Messages become the structured content real chat templates expect (``<image>`` placeholders
   turn into ``{"type": "image"}`` parts).
2. The chat template renders the conversation; each assistant turn's character span is found by
   rendering the prefixes of the conversation (the template must be prefix-stable). A span runs
   from the end of the generation prompt to the end of the turn, end-of-turn token included, so
   the model learns to stop.
3. The rendered text is processed with the images: the processor replaces each image
   placeholder with the image's tokens (and whatever markup the family wraps them in) and says
   where (``return_text_replacement_offsets``); with the character offsets of its tokens, each
   token is either part of one image's block or maps back to the rendered text, where the
   assistant spans decide whether it is supervised.
4. Sequences longer than ``max_seq_length`` are truncated without ever cutting an image's tokens:
   when an image does not fit whole, the text is cut before it and re-encoded with only the
   images before the cut, so every processor output stays consistent with ``input_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .records import IMAGE_PLACEHOLDER, Sample

IGNORE_INDEX = -100

# Tensors with one entry per token, shaped [1, seq], and the value collation pads them with
# (``None``: the tokenizer's pad token id).
TOKEN_LEVEL_KEYS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}

# Skip reasons (``EncodingError.reason``), counted by the data pipeline.
REASON_TOO_LONG = "no assistant tokens after truncation"
REASON_UNENCODABLE = "unencodable"

# Processor / template failures on bad data that we turn into skips (not programming errors).
_DATA_ERRORS: tuple[type[BaseException], ...] = (ValueError, IndexError, KeyError, TypeError, RuntimeError)
try:  # chat templates are jinja2 templates; transformers needs jinja2 to render them
    import jinja2

    _TEMPLATE_ERRORS = (*_DATA_ERRORS, jinja2.TemplateError)
except ImportError:  # pragma: no cover
    _TEMPLATE_ERRORS = _DATA_ERRORS

# Text the image-opener probe puts before an image; any string a tokenizer cannot merge with
# what follows serves.
_PROBE_TEXT = "probe"


class EncodingError(ValueError):
    """A sample that cannot be encoded; the message names the sample and says why.

    ``reason`` is a short stable category for skip counting: :data:`REASON_TOO_LONG` when
    truncation left nothing to learn, :data:`REASON_UNENCODABLE` otherwise.
    """

    def __init__(self, message: str, reason: str = REASON_UNENCODABLE):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EncoderSettings:
    """``max_seq_length``: the most tokens one encoded sample may have, image tokens included."""

    max_seq_length: int

    def __post_init__(self) -> None:
        value = self.max_seq_length
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"data.max_seq_length={value!r} must be a positive integer")


@dataclass(frozen=True)
class _ImageRun:
    """A run of image tokens in the expanded ids: ``[start, end)``, holding images
    ``first_image .. first_image + n_images - 1`` whose first placeholder token starts at ``char``
    of the rendered text."""

    start: int
    end: int
    first_image: int
    n_images: int
    char: int


class ConversationEncoder:
    """Encodes :class:`~vlm.data.records.Sample` s for one processor (see the module docstring).

    ``image_token`` is the family's image token in the model's input ids, the one its image
    features replace (e.g. ``"<|image_pad|>"``); in rendered text an image is the processor's own
    placeholder (``processor.image_token``: Gemma 3 renders ``<start_of_image>`` and expands it to
    soft tokens). The encoder keeps no state between samples.
    """

    def __init__(self, processor: Any, image_token: str, settings: EncoderSettings):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{type(processor).__name__} has no tokenizer")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the processor's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; label masking "
                "needs character offsets, which only fast tokenizers give"
            )
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the image token {image_token!r} is not a token of the processor's tokenizer")
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = int(image_token_id)
        self.placeholder = getattr(processor, "image_token", None) or image_token
        self.settings = settings
        self._image_opener = self._probe_image_opener()
        self._min_image_tokens: int | None = None

    # ---- public API ----------------------------------------------------------------------------
    def __call__(self, sample: Sample) -> dict[str, torch.Tensor]:
        key = sample.key
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in sample.messages)
        if placeholders != len(sample.images):
            raise EncodingError(
                f"sample {key!r}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(sample.images)} image(s)"
            )
        messages = structured_messages(sample.messages)
        full, spans = self._render(key, messages)
        flag = self._add_special_tokens(full)
        encoded, truncated = self._encode(key, full, spans, list(sample.images), flag)
        if not bool((encoded["labels"] != IGNORE_INDEX).any()):
            if truncated:
                raise EncodingError(
                    f"sample {key!r}: no assistant tokens left after truncation to "
                    f"{self.settings.max_seq_length} tokens",
                    REASON_TOO_LONG,
                )
            raise EncodingError(f"sample {key!r}: the assistant turns have no tokens to learn from")
        return encoded

    def min_image_tokens(self) -> int:
        """How many tokens one image takes at least (measured on a small blank image)."""
        if self._min_image_tokens is None:
            counts = []
            for side in (28, 56):
                try:
                    out = self.processor(
                        text=[self.placeholder], images=[[Image.new("RGB", (side, side))]], return_tensors="pt"
                    )
                except _DATA_ERRORS:
                    continue
                counts.append(int((out["input_ids"] == self.image_token_id).sum()))
            if not counts:
                raise ValueError(f"the processor cannot process a blank image with the text {self.placeholder!r}")
            self._min_image_tokens = min(counts)
        return self._min_image_tokens

    # ---- rendering -----------------------------------------------------------------------------
    def _template(self, key: str, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        try:
            text = self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except _TEMPLATE_ERRORS as error:
            raise EncodingError(f"sample {key!r}: the chat template cannot render the conversation: {error}") from error
        if isinstance(text, list):  # some releases return one string per conversation
            text = text[0]
        return text

    def _render(self, key: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans ``[start, end)`` of the assistant turns."""
        if messages and messages[0]["role"] == "assistant":
            # Its span starts where the generation prompt after no turn at all ends, which chat
            # templates cannot render (they need at least one message).
            raise EncodingError(f"sample {key!r}: the conversation starts with an assistant turn, before any prompt")
        full = self._template(key, messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._template(key, messages[:i], add_generation_prompt=True)
            turn = self._template(key, messages[: i + 1])
            for name, prefix in (("generation prompt", prompt), ("conversation", turn)):
                if not full.startswith(prefix):
                    raise EncodingError(
                        f"sample {key!r}: the chat template is not prefix-stable: the rendered {name} up to "
                        f"assistant turn {i} is not a prefix of the whole rendered conversation, so the "
                        "assistant's tokens cannot be located"
                    )
            if len(prompt) > len(turn) or (spans and len(prompt) < spans[-1][1]):
                raise EncodingError(f"sample {key!r}: the chat template renders assistant turn {i} out of order")
            spans.append((len(prompt), len(turn)))
        return full, spans

    def _add_special_tokens(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return bool(bos) and not text.startswith(bos)

    def _probe_image_opener(self) -> str:
        """Special tokens the template puts right before the image token (Qwen's ``<|vision_start|>``).

        Truncation cuts the text before them too, so no image opener is left dangling. Found by
        rendering text followed by an image; ``""`` when the template renders images elsewhere
        or puts ordinary text there.
        """
        probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE_TEXT}, {"type": "image"}]}]
        try:
            rendered = self.processor.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that wants more than this probe gives: no opener then
            return ""
        if isinstance(rendered, list):
            rendered = rendered[0]
        after_text = rendered.find(_PROBE_TEXT)
        if after_text < 0:
            return ""
        after_text += len(_PROBE_TEXT)
        image_at = rendered.find(self.placeholder, after_text)
        if image_at <= after_text:
            return ""
        opener = rendered[after_text:image_at]
        ids = self.tokenizer(opener, add_special_tokens=False)["input_ids"]
        added = self.tokenizer.added_tokens_decoder
        if not ids or any(i not in added or i == self.image_token_id for i in ids):
            return ""
        if self.tokenizer.decode(ids) != opener:
            return ""
        return opener

    # ---- encoding ------------------------------------------------------------------------------
    def _encode(
        self, key: str, text: str, spans: list[tuple[int, int]], images: list[Image.Image], flag: bool
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Encode rendered ``text``; returns the tensors and whether they were truncated."""
        try:
            out = self.processor(
                text=[text],
                images=[images] if images else None,
                return_tensors="pt",
                add_special_tokens=flag,
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
            )
        except _DATA_ERRORS as error:
            raise EncodingError(f"sample {key!r}: the processor cannot process the sample: {error}") from error
        # Bookkeeping for the labels only, not model inputs.
        offsets = out.pop("offset_mapping", None)
        replacements = out.pop("text_replacement_offsets", None) or [[]]
        encoded = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        expanded = encoded["input_ids"]
        if expanded.dim() != 2 or expanded.shape[0] != 1:
            raise EncodingError(f"sample {key!r}: the processor returned input_ids of shape {tuple(expanded.shape)}")
        if offsets is None:
            raise EncodingError(f"sample {key!r}: the processor returned no character offsets of its tokens")

        labels, runs = self._label(key, text, spans, expanded[0].tolist(), offsets[0].tolist(), replacements[0])
        n_images = sum(run.n_images for run in runs)
        if n_images != len(images):
            raise EncodingError(
                f"sample {key!r}: the processor output holds {n_images} image(s) but the sample has {len(images)}"
            )
        encoded["labels"] = torch.tensor([labels], dtype=expanded.dtype)

        length = expanded.shape[1]
        limit = self.settings.max_seq_length
        if length <= limit:
            return encoded, False
        cut_run = next((run for run in runs if run.end > limit), None)
        if cut_run is None:
            return _slice_tokens(encoded, length, limit), True
        # An image does not fit whole: cut the text before it (and before its opener) and
        # re-encode with the images before it only.
        cut = cut_run.char
        opener = self._image_opener
        if opener and text[:cut].endswith(opener):
            cut -= len(opener)
        clipped = [(start, min(end, cut)) for start, end in spans if start < cut]
        shorter, _ = self._encode(key, text[:cut], clipped, images[: cut_run.first_image], flag)
        return shorter, True

    def _label(
        self,
        key: str,
        text: str,
        spans: list[tuple[int, int]],
        ids: list[int],
        offsets: list[list[int]],
        replacements: list[dict[str, Any]],
    ) -> tuple[list[int], list[_ImageRun]]:
        """Labels for the processor's ``ids``, and the image runs in them.

        Each replacement is where the processor expanded one image placeholder: ``span`` in
        ``text``, ``new_span`` in the text it tokenized (``offsets`` index that one). A token that
        overlaps a new span belongs to that image's block, never supervised (markup the tokenizer
        merged with neighbouring whitespace included); any other token maps back to ``text``,
        shifted by what the replacements before it added. Without replacements (a processor that
        expands nothing, as Mllama's) each run of image tokens holds as many images as tokens.
        """
        blocks = sorted(
            ((tuple(r["span"]), tuple(r["new_span"])) for r in replacements if r.get("type", "image") == "image"),
            key=lambda block: block[1],
        )
        for (start, end), _ in blocks:
            if text[start:end] != self.placeholder:
                self._misaligned(key, f"a replacement at characters {start}-{end} is not {self.placeholder!r}")
        labels: list[int] = []
        tokens_of_block: list[list[int]] = [[] for _ in blocks]
        shift = 0
        block = 0
        for n, (token, (start, end)) in enumerate(zip(ids, offsets)):
            if end <= start:  # an added special token: no characters, never supervised
                labels.append(IGNORE_INDEX)
                continue
            while block < len(blocks) and blocks[block][1][1] <= start:
                (old_start, old_end), (new_start, new_end) = blocks[block]
                shift += (new_end - new_start) - (old_end - old_start)
                block += 1
            if block < len(blocks) and end > blocks[block][1][0]:
                tokens_of_block[block].append(n)
                labels.append(IGNORE_INDEX)
                continue
            labels.append(token if _inside(start - shift, end - shift, spans) else IGNORE_INDEX)
        if not blocks:
            return labels, self._image_token_runs(ids, offsets)
        runs = []
        for n, (((char, _), _), tokens) in enumerate(zip(blocks, tokens_of_block)):
            if not tokens:
                self._misaligned(key, f"image {n} has no tokens in the processor output")
            runs.append(_ImageRun(start=tokens[0], end=tokens[-1] + 1, first_image=n, n_images=1, char=char))
        return labels, runs

    def _image_token_runs(self, ids: list[int], offsets: list[list[int]]) -> list[_ImageRun]:
        """Runs of the image token in ``ids`` of unexpanded text, one image per token."""
        runs: list[_ImageRun] = []
        n = 0
        while n < len(ids):
            if ids[n] != self.image_token_id:
                n += 1
                continue
            length = _run_length(ids, n, self.image_token_id)
            first = sum(run.n_images for run in runs)
            runs.append(_ImageRun(start=n, end=n + length, first_image=first, n_images=length, char=offsets[n][0]))
            n += length
        return runs

    def _misaligned(self, key: str, what: str) -> None:
        raise EncodingError(
            f"sample {key!r}: the processor output cannot be mapped back to the rendered text: {what}; "
            f"the processor may expand {self.placeholder!r} in a way this encoder does not know"
        )


def structured_messages(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Messages with string contents → chat-template content parts.

    Each :data:`IMAGE_PLACEHOLDER` becomes ``{"type": "image"}``; the text around it becomes
    ``{"type": "text", "text": ...}`` parts with the whitespace next to placeholders stripped, and
    empty text parts dropped.
    """
    result = []
    for message in messages:
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
        parts: list[dict[str, str]] = []
        for n, piece in enumerate(pieces):
            if n > 0:
                parts.append({"type": "image"})
                piece = piece.lstrip()
            if n < len(pieces) - 1:
                piece = piece.rstrip()
            if piece:
                parts.append({"type": "text", "text": piece})
        result.append({"role": message["role"], "content": parts})
    return result


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a token with characters ``[start, end)`` is supervised: it starts inside a span.

    Tokens without characters (added BOS/EOS, offsets ``(0, 0)``) are never supervised.
    """
    if end <= start:
        return False
    return any(s <= start < e for s, e in spans)


def _run_length(ids: list[int], at: int, token: int) -> int:
    n = at
    while n < len(ids) and ids[n] == token:
        n += 1
    return n - at


def _slice_tokens(encoded: dict[str, torch.Tensor], length: int, limit: int) -> dict[str, torch.Tensor]:
    """Keep the first ``limit`` tokens of every token-level tensor.

    Tensors with a leading batch dimension whose dim 1 has the sequence length (Mllama's
    ``cross_attention_mask``) are cut along dim 1; per-image tensors are left alone (every image
    is whole by then).
    """
    result = {}
    for name, value in encoded.items():
        if name in TOKEN_LEVEL_KEYS or (value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == length):
            value = value[:, :limit]
        result[name] = value
    return result


__all__ = [
    "IGNORE_INDEX",
    "REASON_TOO_LONG",
    "REASON_UNENCODABLE",
    "TOKEN_LEVEL_KEYS",
    "ConversationEncoder",
    "EncoderSettings",
    "EncodingError",
    "structured_messages",
]
