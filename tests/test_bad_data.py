"""Specification of bad data: every kind is normalized or skipped with a counted reason, and data
with nothing usable stops a run within seconds, naming the shards, a few samples and the reasons."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from vlm.data.datamodule import ShardDataModule
from vlm.data.encoding import IGNORE_INDEX, REASON_TOO_LONG
from vlm.data.images import to_rgb
from vlm.data.records import (
    REASON_BAD_JSON,
    REASON_EMPTY_CONVERSATION,
    REASON_IMAGE_TOO_LARGE,
    REASON_MISSING_IMAGE,
    REASON_NO_ASSISTANT_TURN,
    REASON_PLACEHOLDER_MISMATCH,
    REASON_TRUNCATED_SHARD,
    REASON_UNKNOWN_ROLE,
    REASON_UNREADABLE_IMAGE,
    REASON_UNREADABLE_SHARD,
    DataError,
    normalize_conversation,
)
from vlm.data.reporting import SkipReport
from vlm.data.shards import ImageFile, ShardSeries, encode_record
from vlm.data.stream import sample_stream
from vlm.models.families import get_family
from vlm.models.loading import load_processor

MAX_SEQ_LENGTH = 128
END_OF_TURN = "<|im_end|>"


# --- building records -----------------------------------------------------------------------------


def image_bytes(image: Image.Image, pil_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds almost none: PIL checks the
    decompression-bomb limit on opening, before it decodes anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def answer_of(index: int) -> str:
    """A different answer for every good sample (three vocabulary digits), to tell them apart in batches."""
    return " ".join(str(index // 5**p % 5) for p in (2, 1, 0))


def qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def good_record(index: int, images: list[ImageFile]) -> dict:
    question = "<image>\n" * len(images) + "what colour is the circle ?"
    return encode_record(f"good-{index:03d}", qa(question, answer_of(index)), images)


def raw_record(key: str, conversations, files: dict[str, bytes], listed: list[str] | None = None) -> dict:
    """A record as the shard stores it, written as given: no check of what it holds."""
    meta = {"conversations": conversations} | ({"images": listed} if listed is not None else {})
    return {"__key__": key, "json": json.dumps(meta).encode(), **files}


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


RED = Image.new("RGB", (32, 32), (200, 30, 30))


def good_images() -> list[list[ImageFile]]:
    """The images of the good records: every mode the reader normalizes, and the plain cases."""
    palette = RED.convert("P", palette=Image.Palette.ADAPTIVE)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    sixteen_bit = Image.new("I;16", (32, 32), 40000)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    return [
        [ImageFile(image_bytes(RED), "png")],
        [ImageFile(image_bytes(RED.convert("CMYK"), "JPEG"), "jpg")],
        [ImageFile(image_bytes(palette), "png")],
        [ImageFile(image_bytes(transparent), "png")],
        [ImageFile(image_bytes(sixteen_bit), "png")],
        [ImageFile(image_bytes(rgba), "png")],
        [ImageFile(image_bytes(Image.new("LA", (32, 32), (90, 128))), "png")],
        [ImageFile(image_bytes(RED), "png"), ImageFile(image_bytes(RED, "JPEG"), "jpg")],
        [],
    ]


def bad_records() -> list[tuple[dict, str]]:
    """One record of every kind of bad data, with the reason it is skipped for."""
    png, jpeg = image_bytes(RED), image_bytes(Image.new("RGB", (64, 64), (9, 99, 199)), "JPEG")
    turns = [human("<image>\nwhat colour is the circle ?"), gpt("red")]
    too_long = " ".join(["how many shapes are there ?"] * MAX_SEQ_LENGTH)
    return [
        (raw_record("png-cut-in-half", turns, {"png": png[: len(png) // 2]}), REASON_UNREADABLE_IMAGE),
        (raw_record("jpeg-cut-in-half", turns, {"jpg": jpeg[: len(jpeg) // 2]}), REASON_UNREADABLE_IMAGE),
        (raw_record("not-an-image", turns, {"png": b"hello"}), REASON_UNREADABLE_IMAGE),
        (raw_record("listed-image-absent", turns, {}, listed=["png"]), REASON_MISSING_IMAGE),
        (raw_record("placeholder-no-image", turns, {}), REASON_MISSING_IMAGE),
        (raw_record("bomb-warning-size", turns, {"png": png_header_only(10_000, 10_000)}), REASON_IMAGE_TOO_LARGE),
        (raw_record("bomb-error-size", turns, {"png": png_header_only(20_000, 10_000)}), REASON_IMAGE_TOO_LARGE),
        (raw_record("empty-conversation", [], {}), REASON_EMPTY_CONVERSATION),
        (raw_record("no-assistant", [human("what colour is the circle ?")], {}), REASON_NO_ASSISTANT_TURN),
        (raw_record("unknown-role", [{"from": "robot", "value": "hi"}, gpt("red")], {}), REASON_UNKNOWN_ROLE),
        (
            raw_record("two-placeholders-one-image", [human("<image> <image>"), gpt("red")], {"png": png}),
            REASON_PLACEHOLDER_MISMATCH,
        ),
        (raw_record("too-long", [human(too_long), gpt("3")], {}), REASON_TOO_LONG),
        ({"__key__": "bad-json", "json": b"{not json", "png": png}, REASON_BAD_JSON),
    ]


def write_mixed_shard(out_dir: Path) -> tuple[Path, list[str], Counter]:
    """One shard with every bad record among twice as many good ones; returns it, the good
    records' answers and the expected skips per reason."""
    images = good_images()
    bad = bad_records()
    n_good = 2 * len(bad)
    goods = [good_record(i, images[i % len(images)]) for i in range(n_good)]
    # LLaVA style: an image and no placeholder for it.
    goods[-1] = raw_record(
        f"good-{n_good - 1:03d}", [human("what is it ?"), gpt(answer_of(n_good - 1))], {"png": image_bytes(RED)}
    )
    with ShardSeries(out_dir, "mixed", 1000) as series:
        for i, (record, _) in enumerate(bad):
            series.write(goods[2 * i])
            series.write(record)
            series.write(goods[2 * i + 1])
    return series.paths[0], [answer_of(i) for i in range(n_good)], Counter(reason for _, reason in bad)


def write_bad_shard(out_dir: Path, name: str = "bad") -> Path:
    with ShardSeries(out_dir, name, 1000) as series:
        for record, _ in bad_records():
            series.write(record)
    return series.paths[0]


def write_good_shard(out_dir: Path, name: str, n: int, first: int = 0) -> Path:
    with ShardSeries(out_dir, name, 1000) as series:
        for i in range(first, first + n):
            series.write(good_record(i, [ImageFile(image_bytes(RED), "png")]))
    return series.paths[0]


# --- reading through the data module ---------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    family = get_family("qwen2_vl")
    return family, load_processor(tiny_checkpoint("qwen2_vl"), family)


def data_module(qwen, urls, num_workers: int = 0, **options) -> ShardDataModule:
    family, processor = qwen
    settings = {"batch_size": 4, "max_seq_length": MAX_SEQ_LENGTH, "num_workers": num_workers, "shuffle_buffer": 0}
    settings |= options
    return ShardDataModule(
        urls,
        processor,
        family.image_token,
        processor.tokenizer.pad_token_id,
        batch_major_keys=family.batch_major_image_keys,
        **settings,
    )


def answers(batches, tokenizer) -> list[str]:
    """The supervised text of every sample of ``batches``, without the end-of-turn token."""
    found = []
    for batch in batches:
        for labels in batch["labels"]:
            text = tokenizer.decode(labels[labels != IGNORE_INDEX])
            found.append(text.replace(END_OF_TURN, "").strip())
    return found


@pytest.mark.parametrize("num_workers", [0, 1])
def test_one_pass_over_a_shard_of_every_bad_record_yields_each_good_sample_once_and_counts_each_skip(
    qwen, tmp_path, num_workers
):
    shard, expected_answers, expected_skips = write_mixed_shard(tmp_path)
    data = data_module(qwen, str(shard), num_workers)
    batches = list(data.stream_dataloader(str(shard), "data.urls"))

    assert sorted(answers(batches, qwen[1].tokenizer)) == sorted(expected_answers)
    assert data.skipped == expected_skips
    assert data.delivered == len(expected_answers)
    assert all(set(batch) >= {"input_ids", "labels"} and "skipped_samples" not in batch for batch in batches)


def test_the_training_stream_over_bad_records_keeps_going_pass_after_pass(qwen, tmp_path):
    shard, expected_answers, expected_skips = write_mixed_shard(tmp_path)
    data = data_module(qwen, str(shard), batch_size=2, shuffle_buffer=8)
    passes = 3
    batches = list(itertools.islice(data.train_dataloader(), passes * len(expected_answers) // 2))
    assert sorted(answers(batches, qwen[1].tokenizer)) == sorted(expected_answers * passes)
    # The last pass's skips after its last good sample travel with a batch not taken yet.
    at_least = Counter({reason: (passes - 1) * n for reason, n in expected_skips.items()})
    assert at_least <= data.skipped <= Counter({reason: passes * n for reason, n in expected_skips.items()})


def test_images_of_every_mode_become_rgb_with_transparency_on_white():
    assert to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (2, 2), (0, 255))).getpixel((0, 0)) == (0, 0, 0)
    half = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128))).getpixel((0, 0))
    assert all(125 <= channel <= 128 for channel in half)
    assert to_rgb(Image.new("I;16", (2, 2), 40000)).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("RGB", (2, 2), (10, 200, 30)).convert("P")
    assert to_rgb(palette).getpixel((0, 0)) == palette.convert("RGB").getpixel((0, 0))
    for mode in ("1", "L", "P", "I", "F", "CMYK", "YCbCr", "RGBA", "LA", "PA", "I;16"):
        assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB", mode


def test_the_conversation_reasons_are_told_apart():
    cases = [([], REASON_EMPTY_CONVERSATION), ([human("hi")], REASON_NO_ASSISTANT_TURN)]
    cases.append(([{"from": "bot", "value": "hi"}, gpt("x")], REASON_UNKNOWN_ROLE))
    for conversation, reason in cases:
        with pytest.raises(ValueError) as caught:
            normalize_conversation(conversation, key="k")
        assert caught.value.reason == reason


# --- shards that are cut or not shards at all -----------------------------------------------------


def cut_inside_member(shard: Path, member_index: int) -> tuple[Path, list[str]]:
    """A copy of ``shard`` cut in the middle of the data of its ``member_index``-th file; returns it
    and the keys of the samples wholly before the sample of that file."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut_member = members[member_index]
    cut = shard.with_name("cut-" + shard.name)
    cut.write_bytes(shard.read_bytes()[: cut_member.offset_data + cut_member.size // 2])
    cut_key = cut_member.name.split(".")[0]
    before = list(dict.fromkeys(m.name.split(".")[0] for m in members[:member_index]))
    return cut, [key for key in before if key != cut_key]


def test_a_truncated_shard_keeps_its_samples_before_the_cut_and_is_counted_once(qwen, tmp_path):
    shard = write_good_shard(tmp_path, "train", 30)
    cut, kept = cut_inside_member(shard, 31)  # the png of the 16th sample
    assert len(kept) == 15

    assert [sample.key for sample in sample_stream(str(cut), shuffle_buffer=0, seed=0, repeat=False)] == kept
    data = data_module(qwen, str(cut))
    batches = list(data.stream_dataloader(str(cut), "data.urls"))
    assert sum(len(batch["input_ids"]) for batch in batches) == len(kept)
    assert data.skipped == {REASON_TRUNCATED_SHARD: 1}


def test_a_file_that_is_not_a_tar_and_a_shard_gone_since_startup_are_unreadable_shards(qwen, tmp_path):
    good = write_good_shard(tmp_path, "good", 6)
    not_a_tar = tmp_path / "notes-000000.tar"
    not_a_tar.write_text("these are my notes, not a shard\n" * 40)
    vanishing = write_good_shard(tmp_path, "vanishing", 3, first=50)
    urls = [str(not_a_tar), str(vanishing), str(good)]
    data = data_module(qwen, urls, num_workers=1, val_urls=urls)
    vanishing.unlink()  # after the data module checked that it exists

    batches = list(data.val_dataloader())
    assert sum(len(batch["input_ids"]) for batch in batches) == 6
    assert data.skipped == {REASON_UNREADABLE_SHARD: 2}


# --- no usable data: an error within seconds ------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_on_a_shard_without_a_usable_sample_raises_a_data_error_naming_shard_samples_and_reasons(
    qwen, tmp_path, num_workers
):
    shard = write_bad_shard(tmp_path)
    data = data_module(qwen, str(shard), num_workers)
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        next(iter(data.train_dataloader()))
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert "no usable sample in a full pass over the shards of data.urls" in message
    assert str(shard) in message
    for reason, n in Counter(reason for _, reason in bad_records()).items():
        assert f"{n} {reason}" in message
    assert message.count("  sample '") == 3  # three examples, each naming its sample
    assert "'png-cut-in-half'" in message  # the most frequent reason's first sample


@pytest.mark.timeout(30)
def test_a_shard_list_that_names_only_missing_or_unreadable_shards_raises_the_same_error(qwen, tmp_path):
    shard = write_good_shard(tmp_path, "train", 2)
    data = data_module(qwen, str(shard), num_workers=1)
    shard.write_bytes(b"")  # emptied after startup
    with pytest.raises(DataError, match=rf"(?s)no usable sample.*{shard}.*1 unreadable shard.*empty file"):
        next(iter(data.train_dataloader()))


@pytest.mark.timeout(30)
def test_training_data_that_stops_giving_samples_after_a_pass_stops_the_run_instead_of_spinning(qwen, tmp_path):
    shard = write_good_shard(tmp_path, "train", 4)
    data = data_module(qwen, str(shard), batch_size=2)
    batches = iter(data.train_dataloader())
    assert len(next(batches)["input_ids"]) == len(next(batches)["input_ids"]) == 2  # the first pass
    shard.unlink()
    with pytest.raises(DataError, match=r"(?s)stopped giving usable samples.*after 4 usable.*1 unreadable shard"):
        next(batches)


@pytest.mark.timeout(30)
def test_a_validation_pass_without_a_usable_sample_raises_too(qwen, tmp_path):
    good, bad = write_good_shard(tmp_path, "train", 2), write_bad_shard(tmp_path)
    data = data_module(qwen, str(good), val_urls=str(bad))
    with pytest.raises(DataError, match=r"data\.val_urls"):
        list(data.val_dataloader())


@pytest.mark.timeout(30)
def test_more_skips_than_max_skip_fraction_stop_the_run_once_twenty_samples_were_read(qwen, tmp_path):
    with ShardSeries(tmp_path, "mostly-bad", 1000) as series:
        for i in range(30):
            series.write(raw_record(f"broken-{i:03d}", [human("<image>")], {}))  # no assistant turn
            if i % 3 == 0:
                series.write(good_record(i, [ImageFile(image_bytes(RED), "png")]))
    shard = str(series.paths[0])
    with pytest.raises(DataError) as caught:
        list(data_module(qwen, shard, batch_size=1).stream_dataloader(shard, "data.urls"))
    message = str(caught.value)
    assert "too much unusable data in data.urls" in message and "more than data.max_skip_fraction=0.5" in message
    assert shard in message and "no assistant turn" in message and "'broken-000'" in message
    # The same data within a laxer limit is read to its end.
    lax = data_module(qwen, shard, batch_size=1, max_skip_fraction=1.0)
    assert len(list(lax.stream_dataloader(shard, "data.urls"))) == 10
    assert lax.skipped == {REASON_NO_ASSISTANT_TURN: 30}


def test_a_few_bad_first_records_do_not_stop_a_run(qwen, tmp_path):
    with ShardSeries(tmp_path, "train", 1000) as series:
        for i in range(3):
            series.write(raw_record(f"broken-{i}", [human("hi")], {}))
        for i in range(19):
            series.write(good_record(i, [ImageFile(image_bytes(RED), "png")]))
    shard = str(series.paths[0])
    data = data_module(qwen, shard, batch_size=1)  # the first batch alone: 3 of 4 samples skipped
    assert len(list(data.stream_dataloader(shard, "data.urls"))) == 19


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", True, None])
def test_max_skip_fraction_outside_zero_to_one_is_an_error_naming_the_key(qwen, tmp_path, value):
    with pytest.raises(ValueError, match=r"data\.max_skip_fraction="):
        data_module(qwen, str(write_good_shard(tmp_path, "train", 1)), max_skip_fraction=value)


class _FailsInWorker(IterableDataset):
    def __iter__(self):
        raise DataError("no usable sample in shard /data/x.tar: 3 bad json")


def test_a_data_error_raised_in_a_loader_worker_reaches_the_main_process_with_its_message():
    with pytest.raises(DataError, match=r"no usable sample in shard /data/x\.tar: 3 bad json"):
        next(iter(DataLoader(_FailsInWorker(), num_workers=1)))


# --- the skip report in a real Trainer ------------------------------------------------------------


class _TinyLanguageModel(L.LightningModule):
    """Just enough of a model to train on the batches: embeddings and a linear head."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def _loss(self, batch):
        logits = self.head(self.embed(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX
        )

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_skip_report_logs_one_line_per_validation_and_the_counts_as_metrics(qwen, tmp_path, caplog):
    shard, _, expected_skips = write_mixed_shard(tmp_path)
    data = data_module(qwen, str(shard), val_urls=str(shard))
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SkipReport()],
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="vlm.data"):
        trainer.fit(_TinyLanguageModel(len(qwen[1].tokenizer)), datamodule=data)

    lines = [r for r in caplog.records if r.name == "vlm.data" and r.getMessage().startswith("after validation")]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    # Counts since the run started: the validation pass and the training batches before it.
    assert re.fullmatch(
        r"after validation, data: \d+ samples read, \d+ skipped \(.*%\): \d+ unreadable image, .*",
        lines[0].getMessage(),
    )
    # The validation pass read the whole shard; training read its first batches besides.
    assert trainer.callback_metrics["data/skipped/unreadable_image"] >= expected_skips[REASON_UNREADABLE_IMAGE]
    assert trainer.callback_metrics["data/skipped/no_assistant_tokens_after_truncation"] >= 1
    assert data.skipped[REASON_BAD_JSON] >= 1


# --- the command line -----------------------------------------------------------------------------


def train_command(tmp_path: Path, shard: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "vlm.cli.train",
        f"hydra.run.dir={tmp_path / 'run'}",
        "data=webdataset", f"data.urls={shard}",
        "data.batch_size=2", f"data.max_seq_length={MAX_SEQ_LENGTH}", "data.num_workers=1", "data.shuffle_buffer=0",
        "trainer.max_steps=3", "trainer.val_check_interval=1", "trainer.enable_progress_bar=false",
        "logger=csv", *overrides,
    ]  # fmt: skip


def user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"))
    return env


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess, float]]:
    """``calibration.measure`` → (the bad shard, `vlm-train` finished on it, its seconds), with and without the
    calibration pass that reads the data before the model loads. The two run side by side, on one thread each:
    the tiny model gains nothing from a second, and on two cores the pair takes the time of one."""

    def stopped_run(measure: str) -> tuple[Path, subprocess.CompletedProcess, float]:
        tmp_path = tmp_path_factory.mktemp(f"measure-{measure}")
        shard = write_bad_shard(tmp_path / "shards")
        started = time.monotonic()
        done = subprocess.run(
            train_command(tmp_path, shard, f"calibration.measure={measure}"),
            check=False, cwd=tmp_path, env={**user_env(tmp_path), "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return shard, done, time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(["false", "true"], pool.map(stopped_run, ["false", "true"]), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("measure", ["false", "true"])
def test_the_command_line_stops_on_a_shard_without_usable_samples_with_the_data_error(stopped_runs, measure):
    shard, done, seconds = stopped_runs[measure]
    assert seconds < 90
    assert done.returncode != 0
    assert "DataError: no usable sample in a full pass over the shards of data.urls" in done.stderr, done.stderr[-3000:]
    assert str(shard) in done.stderr and f"3 {REASON_UNREADABLE_IMAGE}" in done.stderr
    assert "calibration needs at least one batch" not in done.stderr
    assert "Epoch 1" not in done.stdout + done.stderr
