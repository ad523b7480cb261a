"""Specification of the LLaVA/ShareGPT converter and the ``vlm-shards convert`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlm.cli.shards import main
from vlm.data.convert import InputFileError, convert, read_records
from vlm.data.stream import sample_stream


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


@pytest.fixture()
def images(tmp_path) -> Path:
    """An image folder with a red PNG, a blue JPEG in a sub-folder, and a corrupt JPEG."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (10, 6), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (7, 7), (0, 0, 255)).save(folder / "sub" / "blue.jpg", quality=100)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return folder


VALID = [
    {"id": "with.placeholder", "image": "red.png", "conversations": [human("<image>\nColour?"), gpt("red")]},
    {"id": "llava", "image": "sub/blue.jpg", "conversations": [human("Colour?"), gpt("blue")]},
    {"id": 7, "images": ["red.png", "sub/blue.jpg"], "conversations": [human("<image> or <image>?"), gpt("first")]},
    {"id": "text-only", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"id": "llava", "image": "red.png", "conversations": [human("Again?"), gpt("red")]},  # duplicate id
]
INVALID = [
    ({"id": "missing", "image": "nowhere.png", "conversations": [human("<image>"), gpt("x")]}, "missing image file"),
    ({"id": "corrupt", "image": "corrupt.jpg", "conversations": [human("<image>"), gpt("x")]}, "unreadable image"),
    (
        {"id": "bad-role", "image": "red.png", "conversations": [{"from": "robot", "value": "x"}, gpt("y")]},
        "bad conversation",
    ),
    ({"id": "no-answer", "conversations": [human("anyone?")]}, "bad conversation"),
    (
        {"id": "mismatch", "image": "red.png", "conversations": [human("<image><image>"), gpt("x")]},
        "placeholder mismatch",
    ),
    (["not", "an", "object"], "bad record"),
]


def records() -> list:
    # Interleave the bad records with the good ones.
    mixed = []
    for i, record in enumerate(VALID):
        mixed.append(record)
        mixed.extend(bad for bad, _ in INVALID[i * 2 : i * 2 + 2])
    return mixed


def write_input(path: Path, items: list, jsonl: bool) -> Path:
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in items) + "\n")
    else:
        path.write_text(json.dumps(items, indent=1))
    return path


EXPECTED_SKIPS = {
    "missing image file": 1,
    "unreadable image": 1,
    "bad conversation": 2,
    "placeholder mismatch": 1,
    "bad record": 1,
}


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_converter_round_trip_keeps_every_valid_record_and_counts_skips(tmp_path, images, jsonl):
    source = write_input(tmp_path / ("data.jsonl" if jsonl else "data.json"), records(), jsonl)
    report = convert(source, images, tmp_path / "out", prefix="train", samples_per_shard=2, progress=False)

    assert report.written == len(VALID)
    assert report.skipped.as_dict() == EXPECTED_SKIPS
    assert [p.name for p in report.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    samples = list(sample_stream(report.pattern, shuffle_buffer=0, seed=0, repeat=False))
    by_key = {s.key: s for s in samples}
    # Keys come from ids, made safe for webdataset (no dots) and unique.
    assert list(by_key) == ["with_placeholder", "llava", "7", "text-only", "llava-10"]

    assert by_key["with_placeholder"].messages == [
        {"role": "user", "content": "<image>\nColour?"},
        {"role": "assistant", "content": "red"},
    ]
    assert by_key["with_placeholder"].images[0].getpixel((0, 0)) == (255, 0, 0)
    # LLaVA records without a placeholder get one in front of the first user turn.
    assert by_key["llava"].messages[0]["content"] == "<image>\nColour?"
    r, g, b = by_key["llava"].images[0].getpixel((3, 3))  # a JPEG: close to, not exactly, blue
    assert r < 10 and g < 10 and b > 245
    # Several images keep their order.
    assert [i.size for i in by_key["7"].images] == [(10, 6), (7, 7)]
    # Text-only records are kept, without images.
    assert by_key["text-only"].images == []
    assert by_key["text-only"].messages[1] == {"role": "assistant", "content": "Hello"}


def test_a_jsonl_line_that_does_not_parse_is_a_counted_skip_not_a_failure(tmp_path, images):
    good = json.dumps(VALID[0])
    source = tmp_path / "data.jsonl"
    source.write_text(f"{good}\n{{broken\n\n{good.replace('with.placeholder', 'again')}\n")
    report = convert(source, images, tmp_path / "out", progress=False)
    assert report.written == 2
    assert report.skipped.as_dict() == {"bad json": 1}


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8", b'[{"id": 1,'], ids=["missing", "binary", "cut"])
def test_an_unreadable_input_file_is_an_input_file_error(tmp_path, content):
    source = tmp_path / "data.json"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(InputFileError, match="data.json"):
        read_records(source)


def test_cli_convert_prints_the_summary_by_reason_and_the_shard_pattern(tmp_path, images, capsys):
    source = write_input(tmp_path / "data.json", records(), jsonl=False)
    out = tmp_path / "out"
    status = main(
        [
            "convert",
            "--input",
            str(source),
            "--images",
            str(images),
            "--out",
            str(out),
            "--prefix",
            "val",
            "--samples-per-shard",
            "3",
            "--image-format",
            "jpg",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert re.search(r"written\W+5\b", printed)
    assert re.search(r"skipped\W+6\b", printed)
    for reason, count in EXPECTED_SKIPS.items():
        assert re.search(rf"{reason}\W+{count}\b", printed), reason
    assert f"{out}/val-{{000000..000001}}.tar" in printed
    assert sorted(p.name for p in out.iterdir()) == ["val-000000.tar", "val-000001.tar"]


def test_cli_convert_fails_only_when_the_input_is_unreadable_or_nothing_was_written(tmp_path, images, capsys):
    out = str(tmp_path / "out")
    assert main(["convert", "--input", str(tmp_path / "absent.json"), "--images", str(images), "--out", out]) == 2
    assert "absent.json" in capsys.readouterr().err

    all_bad = write_input(tmp_path / "bad.json", [bad for bad, _ in INVALID], jsonl=False)
    assert main(["convert", "--input", str(all_bad), "--images", str(images), "--out", out, "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "missing image file" in printed.out  # the summary
    assert "nothing was written" in printed.err
