"""Specification of the sample record, conversation normalisation and the tar shard format."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from vlm.data.records import (
    IMAGE_PLACEHOLDER,
    REASON_BAD_CONVERSATION,
    REASON_BAD_JSON,
    REASON_EMPTY_CONVERSATION,
    REASON_MISSING_IMAGE,
    REASON_NO_ASSISTANT_TURN,
    REASON_PLACEHOLDER_MISMATCH,
    REASON_UNKNOWN_ROLE,
    REASON_UNREADABLE_IMAGE,
    RecordError,
    Sample,
    align_placeholders,
    normalize_conversation,
)
from vlm.data.shards import (
    ImageFile,
    ShardSeries,
    decode_sample,
    encode_image,
    encode_record,
    image_file,
    shard_pattern,
    write_shards,
)
from vlm.data.stream import sample_stream


def solid(colour: tuple[int, int, int], size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def read_all(pattern: str) -> list[Sample]:
    return list(sample_stream(pattern, shuffle_buffer=0, seed=0, repeat=False))


# --- conversations -------------------------------------------------------------------------


def test_normalize_conversation_maps_sharegpt_and_openai_turns_to_canonical_roles():
    sharegpt = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nwhat?"},
        {"from": "gpt", "value": "a cat"},
    ]
    openai = [
        {"role": "system", "content": "be brief"},
        {"role": "User", "content": "<image>\nwhat?"},
        {"role": "assistant", "content": "a cat"},
    ]
    expected = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "<image>\nwhat?"},
        {"role": "assistant", "content": "a cat"},
    ]
    assert normalize_conversation(sharegpt) == expected
    assert normalize_conversation(openai) == expected


@pytest.mark.parametrize(
    ("conversation", "message", "reason"),
    [
        ([], "empty", REASON_EMPTY_CONVERSATION),
        (
            [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}],
            "unknown role 'robot'",
            REASON_UNKNOWN_ROLE,
        ),
        ([{"from": "human", "value": "hi"}], "no assistant turn", REASON_NO_ASSISTANT_TURN),
        (
            [{"from": "human", "value": ["hi"]}, {"from": "gpt", "value": "x"}],
            "must be a string",
            REASON_BAD_CONVERSATION,
        ),
        ([{"text": "hi"}], "neither", REASON_BAD_CONVERSATION),
        ("hello", "must be a list", REASON_BAD_CONVERSATION),
    ],
)
def test_normalize_conversation_rejects_bad_conversations_with_a_clear_message(conversation, message, reason):
    with pytest.raises(RecordError, match=message) as caught:
        normalize_conversation(conversation, key="rec42")
    assert isinstance(caught.value, ValueError)
    assert caught.value.reason == reason
    assert "rec42" in str(caught.value)


def test_align_placeholders_prepends_one_per_image_to_the_first_user_turn_when_there_are_none():
    messages = [{"role": "system", "content": "s"}, *qa("what is this?", "a cat"), *qa("sure?", "yes")]
    aligned = align_placeholders(messages, 2)
    assert aligned[1]["content"] == f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\nwhat is this?"
    assert aligned[3]["content"] == "sure?"
    assert messages[1]["content"] == "what is this?"  # the input is left alone


def test_align_placeholders_rejects_a_count_that_cannot_be_fixed():
    with pytest.raises(RecordError, match="1 <image> placeholder") as caught:
        align_placeholders(qa("<image> and?", "x"), 2, key="k")
    assert caught.value.reason == REASON_PLACEHOLDER_MISMATCH
    with pytest.raises(RecordError):
        align_placeholders(qa("<image>", "x"), 0)


# --- write / read ----------------------------------------------------------------------------


def example_samples() -> list[Sample]:
    return [
        Sample("one", [solid((255, 0, 0))], qa("<image>\ncolour?", "red")),
        Sample(
            "three",
            [solid((0, 255, 0)), solid((0, 0, 255), 12), solid((9, 9, 9), 5)],
            qa("<image> vs <image>?", "green") + qa("and <image>?", "dark"),
        ),
        Sample("text", [], qa("hello", "hi")),
        Sample("system", [solid((1, 2, 3))], [{"role": "system", "content": "sys"}, *qa("<image>", "ok")]),
        Sample("last", [solid((200, 100, 0))], qa("<image>", "orange")),
    ]


def test_write_read_round_trip_keeps_keys_messages_and_images_including_multi_image_samples(tmp_path):
    samples = example_samples()
    paths = write_shards(samples, tmp_path, "train", max_samples_per_shard=2)

    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    read = read_all(shard_pattern(paths))
    assert [s.key for s in read] == [s.key for s in samples]
    for original, copy in zip(samples, read):
        assert copy.messages == original.messages
        assert [pixels(i) for i in copy.images] == [pixels(i) for i in original.images]
        assert [i.size for i in copy.images] == [i.size for i in original.images]
        assert all(i.mode == "RGB" for i in copy.images)


def test_shards_name_a_single_image_by_format_and_several_by_index(tmp_path):
    (path,) = write_shards(example_samples()[:3], tmp_path, "s", max_samples_per_shard=10)
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
        meta = json.loads(tar.extractfile("three.json").read())
    assert names == {"one.json", "one.png", "three.json", "three.0.png", "three.1.png", "three.2.png", "text.json"}
    assert meta["images"] == ["0.png", "1.png", "2.png"]
    assert meta["conversations"][0] == {"from": "human", "value": "<image> vs <image>?"}
    assert meta["conversations"][1]["from"] == "gpt"


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_lossy_formats_round_trip_with_the_right_extension_and_size(tmp_path, image_format):
    paths = write_shards(example_samples(), tmp_path, "x", 100, image_format=image_format)
    with tarfile.open(paths[0]) as tar:
        assert f"one.{image_format}" in tar.getnames()
    read = read_all(str(paths[0]))
    assert [[i.size for i in s.images] for s in read] == [[i.size for i in s.images] for s in example_samples()]


def test_writing_the_same_samples_twice_gives_identical_shards(tmp_path):
    first = write_shards(example_samples(), tmp_path / "a", "t", 3)
    second = write_shards(example_samples(), tmp_path / "b", "t", 3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_no_samples_write_no_shards(tmp_path):
    assert write_shards([], tmp_path, "train", 10) == []


@pytest.mark.parametrize("key", ["a.b", "", "dir/x", "__meta__"])
def test_write_shards_rejects_keys_webdataset_would_misread(tmp_path, key):
    with pytest.raises(ValueError, match="key"):
        write_shards([Sample(key, [], qa("q", "a"))], tmp_path, "t", 10)
    assert not list(tmp_path.glob("*.tar*"))  # the partial shard is removed


def test_write_shards_rejects_duplicate_keys_within_a_shard_and_placeholder_mismatches(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        write_shards([Sample("k", [], qa("q", "a")), Sample("k", [], qa("q", "a"))], tmp_path, "t", 10)
    with pytest.raises(RecordError, match="placeholder"):
        write_shards([Sample("k", [solid((0, 0, 0))], qa("<image><image>", "a"))], tmp_path, "t", 10)


# --- decode_sample -----------------------------------------------------------------------------


def raw(key: str, conversations, images: dict[str, bytes], listed=None) -> dict:
    meta = {"conversations": conversations}
    if listed is not None:
        meta["images"] = listed
    return {"__key__": key, "__url__": "shard-7.tar", "json": json.dumps(meta).encode(), **images}


def test_decode_sample_without_an_images_list_takes_image_entries_in_natural_order():
    colours = {"0.png": (0, 0, 0), "1.png": (1, 1, 1), "2.png": (2, 2, 2), "10.png": (10, 10, 10)}
    entries = {name: encode_image(solid(c)) for name, c in reversed(list(colours.items()))}
    conversation = [{"from": "human", "value": "<image>" * 4}, {"from": "gpt", "value": "ok"}]
    sample = decode_sample(raw("k", conversation, entries))
    assert [i.getpixel((0, 0)) for i in sample.images] == list(colours.values())


def test_decode_sample_prepends_placeholders_for_a_llava_record_without_any():
    conversation = [{"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "red"}]
    sample = decode_sample(raw("k", conversation, {"jpg": encode_image(solid((255, 0, 0)), "jpg")}))
    assert sample.messages[0]["content"] == "<image>\nwhat is it?"
    assert len(sample.images) == 1


@pytest.mark.parametrize("extension", ["jpg", "jpeg", "webp", "png"])
def test_decode_sample_reads_jpeg_webp_and_png_entries(extension):
    image_format = "jpg" if extension == "jpeg" else extension
    conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]
    data = encode_image(solid((250, 0, 0), 12), image_format)
    sample = decode_sample(raw("k", conversation, {extension: data}, listed=[extension]))
    assert sample.images[0].size == (12, 12) and sample.images[0].mode == "RGB"
    r, g, b = sample.images[0].getpixel((6, 6))
    assert r > 240 and g < 10 and b < 10


GOOD_TURNS = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"__key__": "bad", "json": b"{not json", "png": encode_image(solid((0, 0, 0)))}, REASON_BAD_JSON),
        ({"__key__": "bad", "png": encode_image(solid((0, 0, 0)))}, REASON_BAD_JSON),
        (raw("bad", GOOD_TURNS, {"png": b"\x89PNG but not really"}), REASON_UNREADABLE_IMAGE),
        (raw("bad", GOOD_TURNS, {"png": encode_image(solid((0, 0, 0)))[:40]}), REASON_UNREADABLE_IMAGE),
        (raw("bad", GOOD_TURNS, {}, listed=["png"]), REASON_MISSING_IMAGE),
        (
            raw(
                "bad",
                [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
                {"png": encode_image(solid((0, 0, 0)))},
            ),
            REASON_PLACEHOLDER_MISMATCH,
        ),
        (raw("bad", [{"from": "human", "value": "hi"}], {}), REASON_NO_ASSISTANT_TURN),
        (raw("bad", GOOD_TURNS, {}), REASON_MISSING_IMAGE),  # a placeholder and no image entry at all
    ],
)
def test_decode_sample_raises_record_error_naming_the_key_and_the_reason(record, reason):
    with pytest.raises(RecordError) as caught:
        decode_sample(record)
    assert caught.value.reason == reason
    assert "bad" in str(caught.value)


# --- shard patterns ------------------------------------------------------------------------------


def test_shard_pattern_is_a_brace_range_for_a_contiguous_run_that_webdataset_expands_back(tmp_path):
    paths = [tmp_path / f"train-{i:06d}.tar" for i in range(4)]
    pattern = shard_pattern(reversed(paths))
    assert pattern == f"{tmp_path}/train-{{000000..000003}}.tar"
    assert wds.SimpleShardList(pattern).urls == [str(p) for p in paths]


def test_shard_pattern_of_one_path_is_the_path_and_gaps_become_a_brace_list(tmp_path):
    assert shard_pattern([tmp_path / "val-000000.tar"]) == f"{tmp_path}/val-000000.tar"
    assert shard_pattern(["d/t-000000.tar", "d/t-000002.tar"]) == "d/t-{000000,000002}.tar"
    with pytest.raises(ValueError):
        shard_pattern([])
    with pytest.raises(ValueError):
        shard_pattern(["d/a-000000.tar", "d/b-000001.tar"])


# --- image files and records with encoded images --------------------------------------------------


def file_bytes(image: Image.Image, pil_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format)
    return buffer.getvalue()


@pytest.mark.parametrize(("pil_format", "extension"), [("JPEG", "jpg"), ("WEBP", "webp"), ("PNG", "png")])
def test_image_file_keeps_the_bytes_of_formats_the_reader_takes_named_by_their_real_format(pil_format, extension):
    data = file_bytes(solid((10, 20, 30)), pil_format)
    assert image_file(data, "here") == ImageFile(data, extension)


@pytest.mark.parametrize("pil_format", ["BMP", "GIF", "TIFF"])
def test_image_file_re_encodes_other_formats_as_png(pil_format):
    stored = image_file(file_bytes(solid((10, 20, 30)), pil_format), "here")
    assert stored.extension == "png"
    with Image.open(io.BytesIO(stored.data)) as image:
        assert image.format == "PNG" and image.convert("RGB").getpixel((0, 0)) == (10, 20, 30)


def test_image_file_refuses_bytes_that_do_not_decode_in_full():
    data = file_bytes(solid((10, 20, 30), 64), "PNG")
    with pytest.raises(RecordError, match="here: cannot decode image") as caught:
        image_file(data[: len(data) // 2], "here")
    assert caught.value.reason == REASON_UNREADABLE_IMAGE


def test_encode_record_stores_files_as_they_are_and_names_several_by_index_and_own_extension(tmp_path):
    jpeg, png = file_bytes(solid((1, 2, 3)), "JPEG"), file_bytes(solid((4, 5, 6), 5), "PNG")
    record = encode_record("k", qa("<image> then <image>", "ok"), [ImageFile(jpeg, "jpg"), ImageFile(png, "png")])
    assert record["0.jpg"] == jpeg and record["1.png"] == png
    assert json.loads(record["json"])["images"] == ["0.jpg", "1.png"]
    with ShardSeries(tmp_path, "t", 10) as series:
        series.write(record)
    (sample,) = read_all(str(series.paths[0]))
    assert [i.size for i in sample.images] == [(8, 8), (5, 5)]


def test_encode_record_rejects_a_placeholder_mismatch_and_an_extension_the_reader_would_not_take():
    jpeg = ImageFile(file_bytes(solid((1, 2, 3)), "JPEG"), "jpg")
    with pytest.raises(RecordError, match="placeholder") as caught:
        encode_record("k", qa("<image><image>", "ok"), [jpeg])
    assert caught.value.reason == REASON_PLACEHOLDER_MISMATCH
    with pytest.raises(ValueError, match=r"'k'.*\['bmp'\]"):
        encode_record("k", qa("<image>", "ok"), [ImageFile(b"BM...", "bmp")])


def test_a_shard_series_removes_the_shard_it_was_writing_when_an_error_stops_it(tmp_path):
    record = encode_record("k", qa("q", "a"), [])
    with pytest.raises(RuntimeError), ShardSeries(tmp_path, "t", 1) as series:
        series.write(record)
        series.write(dict(record, __key__="k2"))
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000000.tar"]
