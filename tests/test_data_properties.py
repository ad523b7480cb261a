"""Properties of the shard reader, encoder and collator on random conversations and images (hypothesis).

Whatever a record holds (random roles, text, images of random sizes and modes, placeholders that
may not match them, a random context length), reading it either gives a sample or a counted skip,
never a crash; labels fall on the assistant's tokens only; and an image's tokens are never cut.
The assistant's tokens are found from Qwen2-VL's chat markup (``<|im_start|>assistant\\n ...
<|im_end|>\\n``), independently of how the encoder finds them.
"""

from __future__ import annotations

import io
import json
import re
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm.data.collate import collate
from vlm.data.datamodule import ShardDataModule
from vlm.data.demo import DEMO_VOCABULARY
from vlm.data.encoding import IGNORE_INDEX, TOKEN_LEVEL_KEYS, ConversationEncoder, EncoderSettings, EncodingError
from vlm.data.records import IMAGE_PLACEHOLDER, DataError, Sample
from vlm.data.shards import ShardSeries
from vlm.models.families import get_family
from vlm.models.loading import load_processor

# Mostly known roles, sometimes a system turn, now and then one that is unknown ("robot").
ROLES = ["human", "user"] * 3 + ["gpt", "assistant"] * 3 + ["system", "robot"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"]
PROPERTY_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n.*?(?:<\|im_end\|>\n?|\Z)", re.DOTALL)


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    family = get_family("qwen2_vl")
    return family, load_processor(tiny_checkpoint("qwen2_vl"), family)


# --- random records -------------------------------------------------------------------------------

words = st.lists(st.sampled_from(DEMO_VOCABULARY), max_size=40).map(" ".join)


@st.composite
def images(draw) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    colour = draw(st.integers(0, 255))
    if mode == "I;16":
        colour *= 257
    elif mode in ("RGB", "RGBA", "CMYK", "LA"):
        colour = tuple([colour] * len(mode))
    return Image.new(mode, size, colour)


def image_file(image: Image.Image) -> tuple[str, bytes]:
    """The image as a file of the format its mode can be stored in: (extension, bytes)."""
    extension, pil_format = ("jpg", "JPEG") if image.mode == "CMYK" else ("png", "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format)
    return extension, buffer.getvalue()


@st.composite
def conversations(draw, n_images: int) -> list[dict[str, str]]:
    rarely_empty = 0 if draw(st.integers(0, 9)) == 0 else 1
    turns = draw(st.lists(st.tuples(st.sampled_from(ROLES), words), min_size=rarely_empty, max_size=5))
    turns = [{"from": role, "value": text} for role, text in turns]
    if turns and draw(st.integers(0, 9)):
        turns.insert(0, {"from": "human", "value": draw(words)})  # most start with a question
    if turns and draw(st.booleans()):
        turns.append({"from": "gpt", "value": draw(words)})  # most conversations end with an answer
    placeholders = draw(st.integers(0, 3)) if draw(st.booleans()) else n_images  # mostly matching
    for _ in range(placeholders if turns else 0):
        turn = turns[draw(st.integers(0, len(turns) - 1))]
        turn["value"] = f"{IMAGE_PLACEHOLDER}\n{turn['value']}"
    return turns


@st.composite
def records(draw, key: str) -> dict:
    """A record as a shard stores it (``webdataset.TarWriter`` fields), not checked in any way."""
    pictures = draw(st.lists(images(), max_size=3))
    files = [image_file(picture) for picture in pictures]
    names = [ext for ext, _ in files] if len(files) == 1 else [f"{i}.{ext}" for i, (ext, _) in enumerate(files)]
    meta = {"conversations": draw(conversations(len(pictures)))}
    if draw(st.booleans()):
        meta["images"] = names  # else the reader takes every image entry
    return {"__key__": key, "json": json.dumps(meta).encode(), **dict(zip(names, (data for _, data in files)))}


@st.composite
def samples(draw, key: str) -> Sample:
    """A well-formed sample: one placeholder per RGB image, an assistant turn, random text."""
    pictures = [image.convert("RGB") for image in draw(st.lists(images(), max_size=3))]
    turns = draw(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), words), min_size=1, max_size=4))
    messages = [{"role": role, "content": text} for role, text in turns] + [{"role": "assistant", "content": "yes"}]
    user_turns = [m for m in messages if m["role"] == "user"] or [messages[0]]
    for _ in pictures:
        turn = user_turns[draw(st.integers(0, len(user_turns) - 1))]
        turn["content"] = f"{IMAGE_PLACEHOLDER}\n{turn['content']}"
    return Sample(key, pictures, messages)


# --- what every batch must satisfy ----------------------------------------------------------------


def assert_labels_only_on_assistant_tokens(ids: list[int], labels: list[int], tokenizer) -> None:
    pieces = [tokenizer.decode([token]) for token in ids]
    text = "".join(pieces)
    turns = [match.span() for match in ASSISTANT_TURN.finditer(text)]
    start = 0
    for token, label, piece in zip(ids, labels, pieces):
        end = start + len(piece)
        if label != IGNORE_INDEX:
            assert label == token
            assert any(s <= start and end <= e for s, e in turns), (piece, text)
        start = end


def image_runs(ids: list[int], image_token_id: int) -> list[int]:
    """The lengths of the runs of image tokens in ``ids``, in order."""
    runs, n = [], 0
    for token in [*ids, None]:
        if token == image_token_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def check_batch(batch: dict[str, torch.Tensor], processor, image_token_id: int, max_seq_length: int) -> None:
    merge = processor.image_processor.merge_size
    # One image's tokens: its grid's patches over merge² (patches merged into one token).
    image_tokens = [int(grid.prod()) // merge**2 for grid in batch.get("image_grid_thw", [])]
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        assert length <= max_seq_length
        ids = batch["input_ids"][row, :length].tolist()
        labels = batch["labels"][row].tolist()
        assert all(label == IGNORE_INDEX for label in labels[length:])  # padding is never learned
        assert_labels_only_on_assistant_tokens(ids, labels[:length], processor.tokenizer)
        runs = image_runs(ids, image_token_id)
        assert runs == image_tokens[: len(runs)]  # every image whole, in order
        image_tokens = image_tokens[len(runs) :]
    assert not image_tokens  # and every image of the batch is in some row


# --- the properties -------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(data=st.data(), max_seq_length=st.integers(16, 160), batch_size=st.integers(1, 3), n=st.integers(1, 6))
def test_any_shard_reads_into_samples_or_counted_skips_with_labels_on_the_assistant_and_images_whole(
    qwen, data, max_seq_length, batch_size, n
):
    family, processor = qwen
    raw = [data.draw(records(f"r{i}")) for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        with ShardSeries(folder, "random", 100) as series:
            for record in raw:
                series.write(record)
        shard = str(series.paths[0])
        module = ShardDataModule(
            shard,
            processor,
            family.image_token,
            processor.tokenizer.pad_token_id,
            batch_major_keys=family.batch_major_image_keys,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            num_workers=0,
            shuffle_buffer=0,
            max_skip_fraction=1.0,
        )
        image_token_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
        try:
            for batch in module.stream_dataloader(shard, "data.urls"):
                check_batch(batch, processor, image_token_id, max_seq_length)
        except DataError as error:
            assert module.delivered == 0, error  # the one error: not a single usable sample
    assert module.delivered + sum(module.skipped.values()) == n  # each record once: a sample or a skip


@PROPERTY_SETTINGS
@given(data=st.data(), max_seq_length=st.integers(16, 160), n=st.integers(1, 4))
def test_collation_keeps_every_encoded_sample_and_pads_only_after_it(qwen, data, max_seq_length, n):
    family, processor = qwen
    encoder = ConversationEncoder(processor, family.image_token, EncoderSettings(max_seq_length))
    encoded = []
    for i in range(n):
        try:
            encoded.append(encoder(data.draw(samples(f"s{i}"))))
        except EncodingError as error:
            assert error.reason  # a counted skip (nothing left to learn after truncation), not a crash
    if not encoded:
        return
    pad = processor.tokenizer.pad_token_id
    batch = collate(encoded, pad_token_id=pad, batch_major_keys=family.batch_major_image_keys)
    check_batch(batch, processor, processor.tokenizer.convert_tokens_to_ids(family.image_token), max_seq_length)
    for row, sample in enumerate(encoded):
        length = sample["input_ids"].shape[1]
        for key, fill in TOKEN_LEVEL_KEYS.items():
            if key not in sample:
                continue
            assert torch.equal(batch[key][row, :length], sample[key][0])
            assert (batch[key][row, length:] == (pad if fill is None else fill)).all()
    if "pixel_values" in batch:
        assert torch.equal(
            batch["pixel_values"], torch.cat([s["pixel_values"] for s in encoded if "pixel_values" in s])
        )
