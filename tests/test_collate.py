"""Collation: padding rules on plain tensors, and real batches of every family through its tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlm.data.collate import collate
from vlm.data.encoding import IGNORE_INDEX, ConversationEncoder, EncoderSettings
from vlm.data.records import Sample
from vlm.models.families import FAMILIES

FAMILY_NAMES = sorted(FAMILIES)
PAD = 7


def token_sample(ids: list[int], supervised_from: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[:, :supervised_from] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, **extra}


# ---- padding rules --------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_level_keys_are_padded_to_the_longest(side):
    a = token_sample([1, 2, 3, 4], 2, mm_token_type_ids=torch.tensor([[0, 1, 1, 0]]))
    b = token_sample([5, 6], 1, mm_token_type_ids=torch.tensor([[0, 0]]))
    batch = collate([a, b], pad_token_id=PAD, batch_major_keys=frozenset(), padding_side=side)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4]
    if side == "right":
        assert batch["input_ids"][1].tolist() == [5, 6, PAD, PAD]
        assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0]
        assert batch["labels"][1].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX]
        assert batch["mm_token_type_ids"][1].tolist() == [0, 0, 0, 0]
    else:
        assert batch["input_ids"][1].tolist() == [PAD, PAD, 5, 6]
        assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1]
        assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6]
    for key, value in batch.items():
        assert value.dtype == a[key].dtype, key


def test_per_image_keys_are_padded_and_concatenated():
    # LLaVA-NeXT style: [n_images, n_patches, C, H, W] with different patch counts, plus image_sizes.
    a = token_sample([1, 2], 0, pixel_values=torch.ones(2, 3, 1, 2, 2), image_sizes=torch.tensor([[4, 4], [4, 8]]))
    b = token_sample([1], 0)  # text-only
    c = token_sample([1, 2, 3], 0, pixel_values=torch.full((1, 5, 1, 2, 2), 2.0, dtype=torch.bfloat16).float(),
                     image_sizes=torch.tensor([[8, 8]]))
    batch = collate([a, b, c], pad_token_id=PAD, batch_major_keys=frozenset())
    assert batch["pixel_values"].shape == (3, 5, 1, 2, 2)
    assert batch["pixel_values"].dtype == torch.float32
    assert bool((batch["pixel_values"][:2, :3] == 1).all()) and bool((batch["pixel_values"][:2, 3:] == 0).all())
    assert bool((batch["pixel_values"][2] == 2).all())
    assert batch["image_sizes"].tolist() == [[4, 4], [4, 8], [8, 8]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_major_keys_are_padded_and_zero_filled(side):
    # Mllama style: per-sample leading dim, varying image and tile counts, a text-only sample.
    keys = frozenset({"pixel_values", "aspect_ratio_ids", "cross_attention_mask"})
    a = token_sample(
        [1, 2, 3],
        0,
        pixel_values=torch.ones(1, 1, 2, 3),
        aspect_ratio_ids=torch.tensor([[6]]),
        cross_attention_mask=torch.ones(1, 3, 1, 2, dtype=torch.int64),
    )
    b = token_sample(
        [1, 2],
        0,
        pixel_values=torch.full((1, 2, 1, 3), 2.0),
        aspect_ratio_ids=torch.tensor([[1, 2]]),
        cross_attention_mask=torch.ones(1, 2, 2, 1, dtype=torch.int64),
    )
    c = token_sample([1, 2, 3, 4], 0)
    batch = collate([a, b, c], pad_token_id=PAD, batch_major_keys=keys, padding_side=side)
    assert batch["pixel_values"].shape == (3, 2, 2, 3)
    assert batch["pixel_values"][0].tolist() == [[[1.0] * 3, [1.0] * 3], [[0.0] * 3, [0.0] * 3]]
    assert batch["pixel_values"][1].tolist() == [[[2.0] * 3, [0.0] * 3], [[2.0] * 3, [0.0] * 3]]
    assert bool((batch["pixel_values"][2] == 0).all())
    assert batch["aspect_ratio_ids"].tolist() == [[6, 0], [1, 2], [0, 0]]
    mask = batch["cross_attention_mask"]
    assert mask.shape == (3, 4, 2, 2) and mask.dtype == torch.int64
    assert bool((mask[2] == 0).all())
    text_positions = [0, 1, 2] if side == "right" else [1, 2, 3]
    assert mask[0, :, 0, :].sum(-1).tolist() == [2 if p in text_positions else 0 for p in range(4)]
    assert int(mask[0, :, 1].sum()) == 0
    assert mask[1, :, :, 0].sum(-1).tolist() == ([2, 2, 0, 0] if side == "right" else [0, 0, 2, 2])
    assert int(mask[1, :, :, 1].sum()) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=PAD, batch_major_keys=frozenset())
    with pytest.raises(ValueError, match="padding_side"):
        collate([token_sample([1], 0)], pad_token_id=PAD, batch_major_keys=frozenset(), padding_side="middle")


# ---- real batches through the tiny models ---------------------------------------------------------
def mixed_samples() -> list[Sample]:
    red, green, blue = (200, 0, 0), (0, 200, 0), (0, 0, 200)
    return [
        Sample(
            key="two-images",
            images=[Image.new("RGB", (40, 30), red), Image.new("RGB", (32, 64), blue)],
            messages=[
                {"role": "system", "content": "answer with one word"},
                {"role": "user", "content": "<image>\n<image>\nhow many shapes are there ?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "what colour is the circle ?"},
                {"role": "assistant", "content": "the circle is red"},
            ],
        ),
        Sample(
            key="one-image",
            images=[Image.new("RGB", (64, 64), green)],
            messages=[
                {"role": "user", "content": "<image> what colour is the circle ?"},
                {"role": "assistant", "content": "green"},
            ],
        ),
        Sample(
            key="text-only",
            images=[],
            messages=[
                {"role": "user", "content": "describe the picture in a few words please"},
                {"role": "assistant", "content": "the red circle is next to a green square and a blue triangle"},
            ],
        ),
    ]


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens the causal LM loss averages over (labels are shifted by one)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


# Mllama's batched forward differs from its single ones by design: it has its own test below.
@pytest.mark.parametrize("name", [name for name in FAMILY_NAMES if name != "mllama"])
def test_batch_loss_is_the_token_weighted_mean_of_sample_losses(tiny_models, name):
    family, processor, directory = tiny_models[name]
    encoder = ConversationEncoder(processor, family.image_token, EncoderSettings(4096))
    samples = mixed_samples()
    encoded = [encoder(sample) for sample in samples]
    lengths = [e["input_ids"].shape[1] for e in encoded]
    assert len(set(lengths)) == len(lengths)  # different lengths: padding is exercised

    model = family.model_class.from_pretrained(directory, dtype=torch.bfloat16).eval()
    batch = collate(
        encoded, pad_token_id=processor.tokenizer.pad_token_id, batch_major_keys=family.batch_major_image_keys
    )
    assert batch["input_ids"].shape == (len(samples), max(lengths))
    with torch.no_grad():
        batch_loss = float(model(**batch).loss)
        sample_losses = [float(model(**e).loss) for e in encoded]
    counts = [supervised_count(e["labels"]) for e in encoded]
    expected = sum(loss * n for loss, n in zip(sample_losses, counts)) / sum(counts)
    assert math.isfinite(batch_loss)
    # Batched and single forwards agree to ~1e-5 here, while supervising the padding would move the
    # loss by 0.04 or more.
    assert batch_loss == pytest.approx(expected, rel=0, abs=1e-3)
    # The same batch with the samples in another order gives the same loss.
    with torch.no_grad():
        reordered = collate(
            encoded[::-1], pad_token_id=processor.tokenizer.pad_token_id, batch_major_keys=family.batch_major_image_keys
        )
        assert float(model(**reordered).loss) == pytest.approx(batch_loss, rel=0, abs=1e-3)


def test_mllama_batches_match_the_processors_own_batching(tiny_models):
    """Mllama's model treats a sample differently in a batch (its cross-attention runs over the
    batch's padded image slots), so per-sample losses are no reference; the processor's own
    batched output is, and collating per-sample encodings must give the same loss."""
    from vlm.data.encoding import structured_messages

    family, processor, directory = tiny_models["mllama"]
    samples = [sample for sample in mixed_samples() if sample.images]
    encoder = ConversationEncoder(processor, family.image_token, EncoderSettings(4096))
    encoded = [encoder(sample) for sample in samples]
    ours = collate(
        encoded,
        pad_token_id=processor.tokenizer.pad_token_id,
        batch_major_keys=family.batch_major_image_keys,
        tile_mask_keys=family.tile_mask_keys,
    )
    texts = [processor.apply_chat_template(structured_messages(s.messages), tokenize=False) for s in samples]
    theirs = dict(
        processor(text=texts, images=[s.images for s in samples], padding=True, return_tensors="pt", add_special_tokens=False)
    )
    for key in ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    # The processor lets padding tokens attend to the images; their outputs are never used.
    real = ours["attention_mask"].bool()
    assert torch.equal(ours["cross_attention_mask"][real], theirs["cross_attention_mask"][real])
    theirs["labels"] = ours["labels"]
    model = family.model_class.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        assert float(model(**ours).loss) == pytest.approx(float(model(**theirs).loss), rel=0, abs=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_truncated_samples_run_through_the_model(tiny_models, name):
    family, processor, directory = tiny_models[name]
    sample = Sample(
        key="image-per-turn",
        images=[Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (32, 64), (0, 0, 200))],
        messages=[
            {"role": "user", "content": "<image>\nwhat colour is the circle ?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "<image>\nwhat colour is the circle ?"},
            {"role": "assistant", "content": "blue"},
        ],
    )
    full = ConversationEncoder(processor, family.image_token, EncoderSettings(4096))(sample)
    image_positions = (full["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(family.image_token)).nonzero()
    # Cut inside the second image's tokens: it is dropped with its tokens, the first answer stays.
    limit = int(image_positions[-1])
    truncated = ConversationEncoder(processor, family.image_token, EncoderSettings(limit))(sample)
    assert truncated["input_ids"].shape[1] <= limit
    model = family.model_class.from_pretrained(directory, dtype=torch.bfloat16).eval()
    batch = collate(
        [truncated, full], pad_token_id=processor.tokenizer.pad_token_id, batch_major_keys=family.batch_major_image_keys
    )
    with torch.no_grad():
        assert math.isfinite(float(model(**truncated).loss))
        assert math.isfinite(float(model(**batch).loss))
