"""Specification of the LLaVA/ShareGPT converter and the ``vlm-shards convert`` command."""

from __future__ import annotations

import json
import random
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vlm.cli.shards import main
from vlm.data.convert import InputFileError, ValidationSplit, convert, read_records
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
        "unknown role",
    ),
    ({"id": "no-answer", "conversations": [human("anyone?")]}, "no assistant turn"),
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
    "unknown role": 1,
    "no assistant turn": 1,
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


# --- image bytes kept as they are ----------------------------------------------------------------

EXIF_ORIENTATION = 0x0112


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like image: random pixels, which no encoder reproduces byte for byte by chance."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A JPEG under a .png name, a WebP, a real PNG, a BMP, a JPEG to be shown rotated (EXIF), a cut JPEG."""
    folder = tmp_path / "photos"
    folder.mkdir()
    noise((40, 30), 1).save(folder / "photo.png", format="JPEG", quality=90)
    noise((20, 10), 2).save(folder / "pic.webp", quality=80)
    noise((8, 8), 3).save(folder / "real.png")
    noise((6, 5), 4).save(folder / "old.bmp")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display rotated by 90 degrees: 40 x 30 stored, 30 x 40 shown
    noise((40, 30), 5).save(folder / "rotated.jpg", exif=exif)
    whole = (folder / "photo.png").read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def one_image(key: str, image: str) -> dict:
    return {"id": key, "image": image, "conversations": [human("<image>\nWhat is it?"), gpt("x")]}


def tar_entries(paths: list[Path]) -> dict[str, bytes]:
    entries = {}
    for path in paths:
        with tarfile.open(path) as tar:
            entries.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return entries


def test_jpeg_webp_and_png_files_go_into_the_shard_byte_for_byte_named_by_their_real_format(tmp_path, photos):
    two = {"id": "both", "images": ["photo.png", "pic.webp"], "conversations": [human("<image> <image>"), gpt("x")]}
    items = [one_image("photo", "photo.png"), one_image("web", "pic.webp"), one_image("png", "real.png"), two]
    source = write_input(tmp_path / "data.json", items, jsonl=False)
    report = convert(source, photos, tmp_path / "out", progress=False)

    entries = tar_entries(report.shards)
    assert entries["photo.jpg"] == (photos / "photo.png").read_bytes()  # a JPEG, whatever its name says
    assert entries["web.webp"] == (photos / "pic.webp").read_bytes()
    assert entries["png.png"] == (photos / "real.png").read_bytes()
    assert entries["both.0.jpg"] == entries["photo.jpg"] and entries["both.1.webp"] == entries["web.webp"]
    assert json.loads(entries["both.json"])["images"] == ["0.jpg", "1.webp"]

    read = {s.key: s for s in sample_stream(report.pattern, shuffle_buffer=0, seed=0, repeat=False)}
    assert read["photo"].images[0].size == (40, 30) and read["web"].images[0].size == (20, 10)
    assert [i.size for i in read["both"].images] == [(40, 30), (20, 10)]
    assert read["png"].images[0].tobytes() == noise((8, 8), 3).tobytes()


def test_a_format_the_reader_does_not_take_is_stored_as_png_with_the_same_pixels(tmp_path, photos):
    source = write_input(tmp_path / "data.json", [one_image("bmp", "old.bmp")], jsonl=False)
    report = convert(source, photos, tmp_path / "out", progress=False)
    entries = tar_entries(report.shards)
    assert set(entries) == {"bmp.json", "bmp.png"}
    (sample,) = sample_stream(report.pattern, shuffle_buffer=0, seed=0, repeat=False)
    assert sample.images[0].tobytes() == noise((6, 5), 4).tobytes()


def test_a_jpeg_keeps_its_exif_orientation_in_its_bytes_and_reads_back_upright(tmp_path, photos):
    source = write_input(tmp_path / "data.json", [one_image("turned", "rotated.jpg")], jsonl=False)
    report = convert(source, photos, tmp_path / "out", progress=False)
    assert tar_entries(report.shards)["turned.jpg"] == (photos / "rotated.jpg").read_bytes()
    (sample,) = sample_stream(report.pattern, shuffle_buffer=0, seed=0, repeat=False)
    assert sample.images[0].size == (30, 40)


def test_a_truncated_jpeg_is_skipped_as_unreadable_although_its_header_is_fine(tmp_path, photos):
    with Image.open(photos / "cut.jpg") as header_only:
        assert header_only.format == "JPEG"  # opening alone would not notice
    items = [one_image("cut", "cut.jpg"), one_image("photo", "photo.png")]
    report = convert(write_input(tmp_path / "data.json", items, jsonl=False), photos, tmp_path / "out", progress=False)
    assert report.written == 1
    assert report.skipped.as_dict() == {"unreadable image": 1}


def test_an_explicit_image_format_re_encodes_every_image(tmp_path, photos):
    source = write_input(tmp_path / "data.json", [one_image("photo", "photo.png")], jsonl=False)
    report = convert(source, photos, tmp_path / "out", image_format="png", progress=False)
    assert tar_entries(report.shards)["photo.png"][:8] == b"\x89PNG\r\n\x1a\n"


# --- validation split ------------------------------------------------------------------------------


def numbered_records(n: int) -> list[dict]:
    """``n`` text-only records with ids r00, r01, ...: quick to convert."""
    return [{"id": f"r{i:02d}", "conversations": [human(f"question {i}"), gpt("answer")]} for i in range(n)]


def keys_in(pattern: str | None) -> set[str]:
    if pattern is None:
        return set()
    return {s.key for s in sample_stream(pattern, shuffle_buffer=0, seed=0, repeat=False)}


def split_keys(tmp_path: Path, items: list, split: ValidationSplit, out: str) -> tuple[set[str], set[str]]:
    source = write_input(tmp_path / f"{out}.jsonl", items, jsonl=True)
    report = convert(source, tmp_path, tmp_path / out, samples_per_shard=3, val_split=split, progress=False)
    assert report.val_written == len(keys_in(report.val_pattern))
    return keys_in(report.pattern), keys_in(report.val_pattern)


def test_a_val_split_is_the_same_on_every_run_disjoint_from_train_and_covers_every_record(tmp_path):
    items = numbered_records(20)
    train, val = split_keys(tmp_path, items, ValidationSplit(count=4, seed=3), "first")
    assert (train, val) == split_keys(tmp_path, items, ValidationSplit(count=4, seed=3), "second")
    assert len(val) == 4 and not train & val
    assert train | val == {r["id"] for r in items}
    assert split_keys(tmp_path, items, ValidationSplit(count=4, seed=4), "other-seed")[1] != val


def test_the_split_is_a_fixed_function_of_input_positions_and_seed_not_of_the_machine():
    # SHA-256 ranks, not hash() or random: these are the same everywhere, in every Python.
    assert ValidationSplit(count=3, seed=0).positions(10) == {4, 7, 9}
    assert ValidationSplit(count=3, seed=1).positions(10) == {4, 7, 8}


@pytest.mark.parametrize(
    ("split", "n_records", "n_val"),
    [
        (ValidationSplit(fraction=0.25), 10, 3),  # 2.5 rounds half up
        (ValidationSplit(fraction=0.2), 10, 2),
        (ValidationSplit(fraction=0.5), 3, 2),  # 1.5 rounds half up
        (ValidationSplit(fraction=0.1), 4, 1),  # 0.4 rounds to 0, but validation gets at least one
        (ValidationSplit(count=7), 10, 7),
    ],
)
def test_val_gets_the_fraction_of_records_rounded_half_up_and_at_least_one_or_exactly_the_count(
    tmp_path, split, n_records, n_val
):
    assert split.size(n_records) == n_val
    train, val = split_keys(tmp_path, numbered_records(n_records), split, "out")
    assert (len(train), len(val)) == (n_records - n_val, n_val)


def test_the_split_does_not_depend_on_which_records_are_bad(tmp_path):
    items = numbered_records(20)
    _, val = split_keys(tmp_path, items, ValidationSplit(fraction=0.3), "all-good")
    broken = [dict(r, conversations=[human("no answer")]) if i % 3 == 0 else r for i, r in enumerate(items)]
    bad_ids = {r["id"] for i, r in enumerate(items) if i % 3 == 0}
    train_after, val_after = split_keys(tmp_path, broken, ValidationSplit(fraction=0.3), "some-bad")
    assert val_after == val - bad_ids
    assert train_after == {r["id"] for r in items} - val - bad_ids


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ValidationSplit(count=5).size(5), r"--val-count 5 leaves no record for training: the input holds 5"),
        (lambda: ValidationSplit(fraction=0.9).size(1), r"--val-fraction 0\.9 leaves no record for training"),
        (lambda: ValidationSplit(fraction=1.0), r"--val-fraction 1\.0 must be between 0 and 1"),
        (lambda: ValidationSplit(count=0), r"--val-count 0 must be a positive integer"),
        (lambda: ValidationSplit(fraction=0.5, count=2), r"exactly one of --val-fraction and --val-count"),
    ],
)
def test_a_split_that_cannot_be_made_is_refused_naming_the_flag(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_split_refuses_val_as_the_prefix_of_the_training_shards(tmp_path):
    source = write_input(tmp_path / "data.json", numbered_records(4), jsonl=False)
    with pytest.raises(ValueError, match="--prefix val names the validation shards"):
        convert(source, tmp_path, tmp_path / "out", prefix="val", val_split=ValidationSplit(count=1), progress=False)


def test_cli_convert_with_val_count_writes_readable_val_shards_beside_train_and_says_how_many_went_where(
    tmp_path, capsys
):
    items = numbered_records(8)
    source = write_input(tmp_path / "data.jsonl", items, jsonl=True)
    out = tmp_path / "out"
    argv = ["convert", "--input", str(source), "--images", str(tmp_path), "--out", str(out), "--no-progress"]
    status = main([*argv, "--samples-per-shard", "2", "--val-count", "3", "--split-seed", "7"])
    printed = capsys.readouterr().out

    assert status == 0
    assert re.search(r"written\W+8\b", printed)
    assert re.search(r"to train shards\W+5\b", printed) and re.search(r"to val shards\W+3\b", printed)
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar", "val-000001.tar"
    ]  # fmt: skip
    assert f"Train shard pattern (for data.urls): {out}/train-{{000000..000002}}.tar" in printed
    assert f"Val shard pattern (for data.val_urls): {out}/val-{{000000..000001}}.tar" in printed
    assert f"\"data.val_urls='{out}/val-{{000000..000001}}.tar'\"" in printed  # Hydra-quoted, for a shell
    train, val = keys_in(f"{out}/train-{{000000..000002}}.tar"), keys_in(f"{out}/val-{{000000..000001}}.tar")
    assert len(val) == 3 and not train & val and train | val == {r["id"] for r in items}
    expected = {items[i]["id"] for i in ValidationSplit(count=3, seed=7).positions(8)}
    assert val == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--val-count", "2", "--val-fraction", "0.5"], "argument --val-fraction: not allowed with argument --val-count"),
        (["--val-fraction", "1.5"], "argument --val-fraction: must be between 0 and 1"),
        (["--val-fraction", "0"], "argument --val-fraction: must be between 0 and 1"),
        (["--val-count", "0"], "argument --val-count: must be a positive integer"),
    ],
)
def test_cli_convert_refuses_split_flags_it_cannot_use_naming_the_flag(tmp_path, capsys, flags, message):
    argv = ["convert", "--input", "x.json", "--images", str(tmp_path), "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_convert_refuses_a_val_count_that_leaves_nothing_to_train_on(tmp_path, capsys):
    source = write_input(tmp_path / "data.json", numbered_records(3), jsonl=False)
    argv = ["convert", "--input", str(source), "--images", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*argv, "--val-count", "3", "--no-progress"]) == 2
    assert "--val-count 3 leaves no record for training" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_convert_help_describes_the_split_and_image_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["convert", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--val-fraction F", "--val-count N", "--split-seed S", "val-*.tar", "byte for byte", "keep"):
        assert words in text, words
