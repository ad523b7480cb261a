"""Encoding of conversation samples: label masking, image-token alignment, truncation, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from vlm.data.encoding import (
    IGNORE_INDEX,
    REASON_TOO_LONG,
    ConversationEncoder,
    EncoderSettings,
    EncodingError,
    structured_messages,
)
from vlm.data.records import Sample
from vlm.models.families import FAMILIES

FAMILY_NAMES = sorted(FAMILIES)
LONG_ANSWER = "the red circle is next to a green square and a blue triangle " * 6


def image(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def encoder_for(tiny_models, name: str, max_seq_length: int = 4096) -> tuple[ConversationEncoder, object]:
    family, processor, _ = tiny_models[name]
    return ConversationEncoder(processor, family.image_token, EncoderSettings(max_seq_length)), family


def supervised_runs(encoded: dict[str, torch.Tensor]) -> list[list[int]]:
    """The label ids of each maximal run of supervised positions."""
    runs, current = [], []
    for label in encoded["labels"][0].tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


def image_runs(encoded: dict[str, torch.Tensor], image_token_id: int) -> list[tuple[int, int]]:
    ids = encoded["input_ids"][0].tolist()
    runs, n = [], 0
    while n < len(ids):
        if ids[n] == image_token_id:
            start = n
            while n < len(ids) and ids[n] == image_token_id:
                n += 1
            runs.append((start, n))
        else:
            n += 1
    return runs


def image_count(family, encoded: dict[str, torch.Tensor]) -> int:
    """How many images the processor outputs describe (family knowledge, for checking only)."""
    if "image_grid_thw" in encoded:
        return encoded["image_grid_thw"].shape[0]
    if "pixel_values" not in encoded:
        return 0
    if "pixel_values" in family.batch_major_image_keys:
        return encoded["pixel_values"].shape[1]
    return encoded["pixel_values"].shape[0]


def assert_consistent(family, encoded: dict[str, torch.Tensor], image_token_id: int, n_images: int) -> None:
    """Token-level tensors share one length; the image tensors describe exactly the image runs."""
    length = encoded["input_ids"].shape[1]
    for key in ("attention_mask", "labels", "mm_token_type_ids"):
        if key in encoded:
            assert encoded[key].shape == (1, length), key
    assert len(image_runs(encoded, image_token_id)) == n_images
    assert image_count(family, encoded) == n_images
    image_positions = encoded["input_ids"] == image_token_id
    assert bool((encoded["labels"][image_positions] == IGNORE_INDEX).all())
    if "image_grid_thw" in encoded:  # one token per merged 2x2 patch group
        assert int(encoded["image_grid_thw"].prod(-1).sum()) // 4 == int(image_positions.sum())
        assert int(encoded["mm_token_type_ids"].sum()) == int(image_positions.sum())
    if "cross_attention_mask" in encoded:
        assert encoded["cross_attention_mask"].shape[:3] == (1, length, n_images)
    if "image_sizes" in encoded:
        assert encoded["image_sizes"].shape[0] == n_images


def decoded_answers(processor, encoded) -> list[str]:
    return [processor.tokenizer.decode(run).strip() for run in supervised_runs(encoded)]


def two_image_sample(answer_1: str = "red", answer_2: str = "green") -> Sample:
    return Sample(
        key="two-images",
        images=[image((200, 0, 0)), image((0, 200, 0), (64, 64))],
        messages=[
            {"role": "user", "content": "<image>\nwhat colour is the circle ?"},
            {"role": "assistant", "content": answer_1},
            {"role": "user", "content": "and here <image> what colour is the circle ?"},
            {"role": "assistant", "content": answer_2},
        ],
    )


# ---- settings and message conversion ---------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "512"])
def test_settings_reject_bad_max_seq_length(value):
    with pytest.raises(ValueError, match="data.max_seq_length"):
        EncoderSettings(max_seq_length=value)


def test_structured_messages_split_placeholders():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "<image>\nfirst <image> \n second"},
        {"role": "assistant", "content": " keep my spaces "},
    ]
    assert structured_messages(messages) == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "first"},
                {"type": "image"},
                {"type": "text", "text": "second"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": " keep my spaces "}]},
    ]


# ---- label masking --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_only_assistant_tokens_are_supervised(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    processor = encoder.processor
    sample = Sample(
        key="one",
        images=[image((200, 0, 0))],
        messages=[
            {"role": "system", "content": "be brief and answer with one word"},
            {"role": "user", "content": "<image>\nwhat colour is the circle ?"},
            {"role": "assistant", "content": "the red circle"},
        ],
    )
    encoded = encoder(sample)
    assert decoded_answers(processor, encoded) == ["the red circle" + processor.tokenizer.eos_token]
    labels, ids = encoded["labels"][0], encoded["input_ids"][0]
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    # Everything before the answer (system, user, image tokens, the generation prompt) is masked.
    first = int(supervised.nonzero()[0])
    prompt = processor.tokenizer.decode(ids[:first])
    assert "be brief" in prompt and "what colour is the circle" in prompt
    assert not bool(supervised[:first].any())
    assert_consistent(family, encoded, encoder.image_token_id, 1)
    assert encoded["labels"].dtype == encoded["input_ids"].dtype


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_two_turns_and_two_images(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    eos = encoder.tokenizer.eos_token
    encoded = encoder(two_image_sample("red", "a green square"))
    assert decoded_answers(encoder.processor, encoded) == ["red" + eos, "a green square" + eos]
    assert_consistent(family, encoded, encoder.image_token_id, 2)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_several_images_in_one_turn(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    eos = encoder.tokenizer.eos_token
    sample = Sample(
        key="three",
        images=[image((200, 0, 0)), image((0, 0, 200), (30, 60)), image((0, 200, 0), (64, 64))],
        messages=[
            {"role": "user", "content": "<image> and <image>\nhow many shapes are there ?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "<image> what colour is the circle ?"},
            {"role": "assistant", "content": "green"},
        ],
    )
    encoded = encoder(sample)
    assert decoded_answers(encoder.processor, encoded) == ["2" + eos, "green" + eos]
    assert_consistent(family, encoded, encoder.image_token_id, 3)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_text_only_sample(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    sample = Sample(
        key="text",
        images=[],
        messages=[
            {"role": "user", "content": "how many shapes are there ?"},
            {"role": "assistant", "content": "3"},
        ],
    )
    encoded = encoder(sample)
    assert decoded_answers(encoder.processor, encoded) == ["3" + encoder.tokenizer.eos_token]
    assert "pixel_values" not in encoded
    assert_consistent(family, encoded, encoder.image_token_id, 0)


# ---- truncation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_truncation_never_cuts_an_image(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    eos = encoder.tokenizer.eos_token
    sample = two_image_sample()
    full = encoder(sample)
    (_, _), (start, end) = image_runs(full, encoder.image_token_id)
    limit = start + (end - start) // 2  # inside the second image's tokens (or just before a one-token image)
    truncated = ConversationEncoder(encoder.processor, encoder.image_token, EncoderSettings(limit))(sample)

    length = truncated["input_ids"].shape[1]
    assert length <= limit
    assert_consistent(family, truncated, encoder.image_token_id, 1)
    # The same tokens as the full encoding, up to the cut before the second image.
    assert torch.equal(truncated["input_ids"][0], full["input_ids"][0, :length])
    assert torch.equal(truncated["labels"][0], full["labels"][0, :length])
    assert decoded_answers(encoder.processor, truncated) == ["red" + eos]
    # Only whole images: nothing of the second image's block is left at the end.
    assert truncated["input_ids"][0, -1] != encoder.image_token_id


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_truncation_before_first_answer_is_a_skip(tiny_models, name):
    encoder, _ = encoder_for(tiny_models, name)
    sample = two_image_sample()
    full = encoder(sample)
    (start, end), _ = image_runs(full, encoder.image_token_id)
    limit = max(1, start + (end - start) // 2)
    short = ConversationEncoder(encoder.processor, encoder.image_token, EncoderSettings(limit))
    with pytest.raises(EncodingError, match=f"'two-images'.*no assistant tokens left after truncation to {limit} tokens") as info:
        short(sample)
    assert info.value.reason == REASON_TOO_LONG


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_truncation_of_text_keeps_max_seq_length_tokens(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    sample = Sample(
        key="long",
        images=[image((200, 0, 0))],
        messages=[
            {"role": "user", "content": "<image>\ndescribe the picture in a few words please"},
            {"role": "assistant", "content": LONG_ANSWER},
        ],
    )
    full = encoder(sample)
    first_answer_token = int((full["labels"][0] != IGNORE_INDEX).nonzero()[0])
    limit = first_answer_token + 10
    assert limit < full["input_ids"].shape[1]
    truncated = ConversationEncoder(encoder.processor, encoder.image_token, EncoderSettings(limit))(sample)
    assert truncated["input_ids"].shape == (1, limit)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(truncated[key][0], full[key][0, :limit]), key
    assert int((truncated["labels"] != IGNORE_INDEX).sum()) == 10
    assert_consistent(family, truncated, encoder.image_token_id, 1)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_truncation_between_images_drops_the_later_image_and_cuts_text(tiny_models, name):
    encoder, family = encoder_for(tiny_models, name)
    sample = two_image_sample()
    full = encoder(sample)
    _, (second_start, _) = image_runs(full, encoder.image_token_id)
    supervised = (full["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist()
    first_answer_end = next(p for p in supervised if p + 1 not in supervised) + 1
    assert first_answer_end < second_start
    # In the text between the first answer and the second image, which then does not fit.
    limit = first_answer_end + (second_start - first_answer_end) // 2
    truncated = ConversationEncoder(encoder.processor, encoder.image_token, EncoderSettings(limit))(sample)
    assert truncated["input_ids"].shape == (1, limit)
    assert torch.equal(truncated["input_ids"][0], full["input_ids"][0, :limit])
    assert_consistent(family, truncated, encoder.image_token_id, 1)


# ---- errors and measurements ----------------------------------------------------------------------
def test_placeholder_count_mismatch_is_an_encoding_error(tiny_models):
    encoder, _ = encoder_for(tiny_models, "llava")
    sample = Sample(
        key="bad",
        images=[image((1, 2, 3))],
        messages=[{"role": "user", "content": "no image here"}, {"role": "assistant", "content": "3"}],
    )
    with pytest.raises(EncodingError, match="'bad'.*placeholder"):
        encoder(sample)


def test_template_that_is_not_prefix_stable_is_rejected(tiny_models):
    _, processor, _ = tiny_models["qwen2_vl"]
    processor = copy.deepcopy(processor)
    # Renders the final turn differently from the same turn inside a longer conversation.
    processor.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% if not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder = ConversationEncoder(processor, "<|image_pad|>", EncoderSettings(512))
    sample = Sample(
        key="unstable",
        images=[],
        messages=[
            {"role": "user", "content": "how many shapes are there ?"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "and now ?"},
            {"role": "assistant", "content": "4"},
        ],
    )
    with pytest.raises(EncodingError, match="'unstable'.*not prefix-stable"):
        encoder(sample)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_min_image_tokens(tiny_models, name):
    encoder, _ = encoder_for(tiny_models, name)
    expected = {
        "llava": 16, "mllama": 1, "qwen2_vl": 1, "qwen2_5_vl": 1, "qwen3_vl": 1, "gemma3": 4, "smolvlm": 4, "idefics3": 4,
    }
    minimum = encoder.min_image_tokens()
    if name in expected:
        assert minimum == expected[name]
    else:  # LLaVA-NeXT: base view plus tiles; no image takes fewer than a square one does
        assert 16 < minimum
        encoded = encoder(two_image_sample())
        runs = image_runs(encoded, encoder.image_token_id)
        assert all(end - start >= minimum for start, end in runs)


def test_unknown_image_token_is_rejected(tiny_models):
    _, processor, _ = tiny_models["llava"]
    with pytest.raises(ValueError, match="not a token"):
        ConversationEncoder(processor, "<no-such-token>", EncoderSettings(64))
