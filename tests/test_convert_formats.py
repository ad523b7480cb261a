"""Specification of the data formats `vlm-shards convert` takes as researchers have them: TRL content lists,
Cauldron texts, LLaVA records in a dataset, and Hugging Face datasets on disk (save_to_disk, parquet, arrow).

Every format is converted into shards that a `vlm-train data=webdataset` run trains on, with the labels on
the assistant's text, and its images in the shards as the input held them.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import datasets
import pytest
from composing import train_on_shards_in_process
from PIL import Image

from vlm.cli.shards import main
from vlm.data.convert import ConversionReport, InputFileError, convert
from vlm.data.encoding import IGNORE_INDEX, ConversationEncoder, EncoderSettings
from vlm.data.formats import RecordLayout
from vlm.data.records import REASON_NO_IMAGE_FOLDER, REASON_UNKNOWN_CONTENT_TYPE
from vlm.data.stream import sample_stream
from vlm.models.families import get_family
from vlm.models.loading import load_processor

QUESTION = "what colour is the circle ?"
COUNT = "how many shapes are there ?"


# --- building inputs -------------------------------------------------------------------------------


def picture(seed: int, image_format: str) -> bytes:
    """A 32x32 photo-like image in ``image_format``: random pixels, which no encoder reproduces by chance."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(seed).randbytes(32 * 32 * 3)).save(buffer, format=image_format)
    return buffer.getvalue()


PNG, JPEG, OTHER_PNG = picture(1, "PNG"), picture(2, "JPEG"), picture(3, "PNG")
IMAGE_ITEM = {"type": "image"}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def turn(role: str, *items: dict) -> dict:
    return {"role": role, "content": list(items)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def embedded(*images: bytes) -> list[dict]:
    """Images as the datasets library stores them."""
    return [{"bytes": data, "path": None} for data in images]


TRL_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
            }
        ),
    }
)


@dataclass(frozen=True)
class Converted:
    """One format's input, converted: the report, and each sample's assistant answers in order."""

    report: ConversionReport
    answers: dict[str, list[str]]


def trl_jsonl(root: Path, images: Path) -> Converted:
    """TRL records in JSONL: an image listed by relative path, one given in its item as a file:// URL, a system turn."""
    records = [
        {
            "id": "trl-listed",
            "images": ["red.png"],
            "messages": [
                turn("system", text("be brief")),
                turn("user", IMAGE_ITEM, text(QUESTION)),
                turn("assistant", text("red")),
            ],
        },
        {
            "id": "trl-own-image",
            "messages": [
                turn("user", {"type": "image", "image": (images / "blue.jpg").as_uri()}, text(QUESTION)),
                turn("assistant", text("blue")),
                turn("user", text(COUNT)),
                turn("assistant", text("1")),
            ],
        },
    ]
    report = convert(write_jsonl(root / "trl.jsonl", records), images, root / "trl", progress=False)
    return Converted(report, {"trl-listed": ["red"], "trl-own-image": ["blue", "1"]})


def save_to_disk_dataset(root: Path) -> Path:
    """A DatasetDict (train and test) in TRL layout with an embedded PNG and an embedded JPEG."""
    rows = {
        "id": ["png", "jpeg"],
        "images": [embedded(PNG), embedded(JPEG)],
        "messages": [
            [turn("user", IMAGE_ITEM, text(QUESTION)), turn("assistant", text("red"))],
            [turn("user", text(COUNT), IMAGE_ITEM), turn("assistant", text("2"))],
        ],
    }
    split = datasets.Dataset.from_dict(rows, features=TRL_FEATURES)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(root / "saved")
    return root / "saved"


def saved_dataset(root: Path) -> Converted:
    report = convert(save_to_disk_dataset(root), None, root / "saved-shards", progress=False)
    return Converted(report, {"png": ["red"], "jpeg": ["2"]})


def llava_parquet(root: Path) -> Converted:
    """LLaVA records in a parquet file: one Image column, `conversations` of from/value turns, a text-only row."""
    rows = {
        "id": ["llava", "text-only"],
        "image": [{"bytes": JPEG, "path": "photo.jpg"}, None],
        "conversations": [
            [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "green"}],
            [{"from": "human", "value": COUNT}, {"from": "gpt", "value": "3"}],
        ],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(root / "llava.parquet")
    report = convert(root / "llava.parquet", None, root / "llava", progress=False)
    return Converted(report, {"llava": ["green"], "text-only": ["3"]})


def cauldron_arrow(root: Path) -> Converted:
    """A Cauldron-style record set in arrow files, read through a glob: two images before the first question."""
    rows = {
        "images": [embedded(PNG, OTHER_PNG)],
        "texts": [
            [{"user": QUESTION, "assistant": "red", "source": "x"}, {"user": COUNT, "assistant": "2", "source": "x"}]
        ],
    }
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({key: datasets.Value("string") for key in ("user", "assistant", "source")}),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(root / "cauldron", num_shards=1)
    report = convert(root / "cauldron" / "data-*.arrow", None, root / "cauldron-shards", progress=False)
    return Converted(report, {"record000000000": ["red", "2"]})


def interleaved_jsonl(root: Path, images: Path) -> Converted:
    """One TRL record with three images between its words over two user turns, the second one an item's own."""
    record = {
        "id": "interleaved",
        "images": ["red.png", "blue.jpg"],
        "messages": [
            turn(
                "user",
                text("is there a"),
                IMAGE_ITEM,
                text("or a"),
                {"type": "image", "path": str(images / "green.png")},
                text("?"),
            ),
            turn("assistant", text("yes")),
            turn("user", IMAGE_ITEM, text(QUESTION)),
            turn("assistant", text("green")),
        ],
    }
    report = convert(write_jsonl(root / "interleaved.jsonl", [record]), images, root / "interleaved", progress=False)
    return Converted(report, {"interleaved": ["yes", "green"]})


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """Where datasets copies the parquet and arrow files it loads: a temporary folder, not the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "red.png").write_bytes(PNG)
    (folder / "blue.jpg").write_bytes(JPEG)
    (folder / "green.png").write_bytes(OTHER_PNG)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, image_folder, datasets_cache) -> dict[str, Converted]:
    """Every format, converted once: name → its report and expected answers."""
    root = tmp_path_factory.mktemp("formats")
    return {
        "trl-jsonl": trl_jsonl(root, image_folder),
        "save_to_disk": saved_dataset(root),
        "parquet": llava_parquet(root),
        "cauldron": cauldron_arrow(root),
        "interleaved": interleaved_jsonl(root, image_folder),
    }


FORMATS = ["trl-jsonl", "save_to_disk", "parquet", "cauldron", "interleaved"]


def samples_of(report: ConversionReport) -> dict:
    return {s.key: s for s in sample_stream(report.pattern, shuffle_buffer=0, seed=0, repeat=False)}


def shard_entries(report: ConversionReport) -> dict[str, bytes]:
    entries = {}
    for path in report.shards:
        with tarfile.open(path) as tar:
            entries.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return entries


# --- every format converts and trains -------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_converts_each_of_its_records_without_a_skip(converted, name):
    result = converted[name]
    assert result.report.skipped.as_dict() == {}
    assert sorted(samples_of(result.report)) == sorted(result.answers)


@pytest.mark.slow
def test_a_training_run_on_the_shards_of_every_format_trains_on_every_sample_of_each(converted, tmp_path):
    urls = [str(path) for name in FORMATS for path in converted[name].report.shards]
    n_samples = sum(len(converted[name].answers) for name in FORMATS)
    assert n_samples == 8  # two steps of four: one whole pass over every shard, no sample twice
    metrics = train_on_shards_in_process(tmp_path, urls, "data.max_seq_length=512", "trainer.enable_progress_bar=false")
    assert metrics["status"] == "completed" and metrics["steps"] == 2
    assert metrics["total_samples"] == n_samples
    assert not any(metrics["skipped_samples"].values())  # so every sample of every shard was trained on


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> ConversationEncoder:
    """The tiny Qwen2-VL's encoder, as the data module of the training run builds it."""
    family = get_family("qwen2_vl")
    processor = load_processor(tiny_checkpoint("qwen2_vl"), family)
    return ConversationEncoder(processor, family.image_token, EncoderSettings(max_seq_length=512))


def learned_texts(encoder: ConversationEncoder, sample) -> list[str]:
    """The text of each run of tokens whose labels are kept (not -100), as the tokenizer decodes it."""
    encoded = encoder(sample)
    pairs = zip(encoded["labels"][0].tolist(), encoded["input_ids"][0].tolist(), strict=True)
    runs = [[token for _, token in run] for kept, run in groupby(pairs, key=lambda p: p[0] != IGNORE_INDEX) if kept]
    return [encoder.tokenizer.decode(run).strip() for run in runs]


@pytest.mark.parametrize("name", FORMATS)
def test_the_labels_of_every_format_fall_on_the_assistant_text_only(converted, encoder, name):
    eos = encoder.tokenizer.eos_token
    for key, sample in samples_of(converted[name].report).items():
        assert learned_texts(encoder, sample) == [answer + eos for answer in converted[name].answers[key]], key


# --- what the formats keep -------------------------------------------------------------------------


def test_png_and_jpeg_bytes_from_a_dataset_go_into_the_shard_unchanged(converted):
    entries = shard_entries(converted["save_to_disk"].report)
    assert entries["png.png"] == PNG
    assert entries["jpeg.jpg"] == JPEG
    assert shard_entries(converted["parquet"].report)["llava.jpg"] == JPEG


def test_images_between_words_keep_their_places_and_their_order(converted, image_folder):
    sample = samples_of(converted["interleaved"].report)["interleaved"]
    assert [m["content"] for m in sample.messages] == [
        "is there a<image>or a<image>?", "yes", f"<image>{QUESTION}", "green"
    ]  # fmt: skip
    # The listed images fill the image items without one of their own, in order: red, (green, its own), blue.
    entries = shard_entries(converted["interleaved"].report)
    assert json.loads(entries["interleaved.json"])["images"] == ["0.png", "1.png", "2.jpg"]
    assert entries["interleaved.0.png"] == (image_folder / "red.png").read_bytes()
    assert entries["interleaved.1.png"] == (image_folder / "green.png").read_bytes()
    assert entries["interleaved.2.jpg"] == (image_folder / "blue.jpg").read_bytes()


def test_raw_bytes_in_an_images_column_or_an_image_item_are_embedded_images_too(tmp_path, datasets_cache):
    rows = {
        "images": [[PNG], []],
        "messages": [
            [turn("user", IMAGE_ITEM), turn("assistant", text("red"))],
            [turn("user", {"type": "image", "image": JPEG}), turn("assistant", text("blue"))],
        ],
    }
    item = {"type": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Value("binary")}
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Value("binary")),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(item)}),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "raw")
    report = convert(tmp_path / "raw", None, tmp_path / "out", progress=False)
    assert report.skipped.as_dict() == {}
    entries = shard_entries(report)
    assert entries["record000000000.png"] == PNG and entries["record000000001.jpg"] == JPEG


def test_a_system_turn_and_the_images_of_trl_records_stay_where_they_were(converted):
    samples = samples_of(converted["trl-jsonl"].report)
    assert samples["trl-listed"].messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"<image>{QUESTION}"},
        {"role": "assistant", "content": "red"},
    ]
    assert samples["trl-own-image"].messages[0]["content"] == f"<image>{QUESTION}"
    jpeg = samples_of(converted["save_to_disk"].report)["jpeg"]
    assert jpeg.messages[0]["content"] == f"{COUNT}<image>"


def test_cauldron_images_go_before_the_first_question_in_their_order(converted):
    (sample,) = samples_of(converted["cauldron"].report).values()
    assert [m["content"] for m in sample.messages] == [f"<image>\n<image>\n{QUESTION}", "red", COUNT, "2"]
    entries = shard_entries(converted["cauldron"].report)
    assert entries["record000000000.0.png"] == PNG and entries["record000000000.1.png"] == OTHER_PNG


# --- what is skipped, and what stops -------------------------------------------------------------


def convert_records(tmp_path: Path, records: list[dict], images: Path | None, **kwargs) -> ConversionReport:
    return convert(write_jsonl(tmp_path / "in.jsonl", records), images, tmp_path / "out", progress=False, **kwargs)


def only_skip(report: ConversionReport) -> tuple[str, str]:
    """The reason and message of the one skipped record."""
    (example,) = report.skipped.examples
    assert report.skipped.total == 1
    return example.reason, example.detail


def test_an_unknown_content_type_is_a_counted_skip_naming_the_item(tmp_path, image_folder):
    video = {
        "id": "video",
        "messages": [turn("user", text(QUESTION)), turn("assistant", {"type": "video"})],
    }
    good = {"id": "good", "images": ["red.png"], "messages": [turn("user", IMAGE_ITEM), turn("assistant", text("red"))]}
    report = convert_records(tmp_path, [video, good], image_folder)
    assert report.written == 1
    reason, detail = only_skip(report)
    assert reason == REASON_UNKNOWN_CONTENT_TYPE
    assert "messages[1].content[0]: unknown type 'video'" in detail


def test_a_missing_image_file_is_a_counted_skip_naming_the_field(tmp_path, image_folder):
    record = {"id": "gone", "images": ["red.png", "nowhere.png"],
              "messages": [turn("user", IMAGE_ITEM, IMAGE_ITEM), turn("assistant", text("red"))]}  # fmt: skip
    reason, detail = only_skip(convert_records(tmp_path, [record], image_folder))
    assert reason == "missing image file"
    assert "images[1]: image file" in detail and "nowhere.png does not exist" in detail


def test_an_image_item_without_an_image_is_a_placeholder_mismatch(tmp_path, image_folder):
    record = {"id": "short", "images": ["red.png"],
              "messages": [turn("user", IMAGE_ITEM, text("or"), IMAGE_ITEM), turn("assistant", text("red"))]}  # fmt: skip
    reason, detail = only_skip(convert_records(tmp_path, [record], image_folder))
    assert reason == "placeholder mismatch"
    assert "2 image item(s) without an image of their own for 1 image(s) in 'images'" in detail


def test_a_relative_image_path_without_an_image_folder_is_a_skip_naming_the_field_and_the_flag(tmp_path):
    record = {
        "id": "relative",
        "images": ["red.png"],
        "messages": [turn("user", IMAGE_ITEM), turn("assistant", text("x"))],
    }
    reason, detail = only_skip(convert_records(tmp_path, [record], None))
    assert reason == REASON_NO_IMAGE_FOLDER
    assert "images[0] is a relative path ('red.png')" in detail and "--images" in detail


def test_a_named_format_is_held_to_its_own_rules(tmp_path, image_folder):
    record = {"id": "trl", "images": ["red.png"], "messages": [turn("user", IMAGE_ITEM), turn("assistant", text("x"))]}
    assert convert_records(tmp_path, [record], image_folder).written == 1
    reason, detail = only_skip(convert_records(tmp_path, [record], image_folder, layout=RecordLayout("openai")))
    assert reason == "bad conversation" and "content must be a string" in detail


def test_a_messages_column_that_is_not_there_stops_the_cli_naming_it_and_the_columns_there(
    tmp_path, datasets_cache, capsys
):
    saved = save_to_disk_dataset(tmp_path)
    out = tmp_path / "out"
    status = main(["convert", "--input", str(saved), "--out", str(out), "--messages-column", "chat", "--no-progress"])
    assert status == 2
    assert "no column 'chat' (--messages-column); its columns: id, images, messages" in capsys.readouterr().err
    assert not out.exists()

    # Named right, the same dataset converts with no image folder: its images are embedded.
    assert main(["convert", "--input", str(saved), "--out", str(out), "--messages-column", "messages"]) == 0
    assert "Shard pattern" in capsys.readouterr().out


def test_a_split_that_is_not_there_is_refused_naming_the_splits_there(tmp_path, datasets_cache):
    saved = save_to_disk_dataset(tmp_path)
    with pytest.raises(
        InputFileError, match=r"no split 'validation'; its splits: train, test \(pick one with --split\)"
    ):
        convert(saved, None, tmp_path / "out", split="validation", progress=False)
    assert convert(saved, None, tmp_path / "test", split="test", progress=False).written == 2


def test_a_dataset_without_a_conversation_column_is_refused_naming_the_flag(tmp_path, datasets_cache):
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(tmp_path / "qa")
    with pytest.raises(InputFileError, match=r"none of the columns conversations, messages, texts.*--messages-column"):
        convert(tmp_path / "qa", None, tmp_path / "out", progress=False)
