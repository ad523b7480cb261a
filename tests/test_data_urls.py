"""Specification of ``data.urls``/``data.val_urls``: every form a user writes, and the loader workers they get."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.utils.data
from hydra import compose, initialize_config_dir
from omegaconf import ListConfig, OmegaConf

from vlm.configs import config_dir, register_resolvers
from vlm.data.datamodule import ShardDataModule, expand_urls, loader_workers
from vlm.data.demo import demo_samples
from vlm.data.shards import write_shards
from vlm.data.stream import sample_stream
from vlm.models.families import get_family
from vlm.models.loading import load_processor


@pytest.fixture()
def shard_dir(tmp_path) -> Path:
    """Four (empty) shard files train-000000.tar .. train-000003.tar and one val-000000.tar."""
    for name in [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar"]:
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def train_shards(shard_dir: Path, *numbers: int) -> list[str]:
    return [str(shard_dir / f"train-{n:06d}.tar") for n in numbers]


def composed_urls(*overrides: str):
    """``data.urls`` as Hydra hands it to the data module for these command-line overrides."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data=webdataset", *overrides])
    return cfg.data.urls


# --- the forms of data.urls ------------------------------------------------------------------------


def test_a_single_path_is_that_one_shard(shard_dir):
    assert expand_urls(str(shard_dir / "val-000000.tar"), "data.urls") == [str(shard_dir / "val-000000.tar")]
    assert expand_urls(shard_dir / "val-000000.tar", "data.urls") == [str(shard_dir / "val-000000.tar")]


def test_a_brace_pattern_is_every_shard_of_its_range_in_order(shard_dir):
    pattern = str(shard_dir / "train-{000001..000003}.tar")
    assert expand_urls(pattern, "data.urls") == train_shards(shard_dir, 1, 2, 3)


def test_a_glob_is_the_sorted_files_it_matches(shard_dir):
    assert expand_urls(str(shard_dir / "train-*.tar"), "data.urls") == train_shards(shard_dir, 0, 1, 2, 3)


def test_a_list_keeps_its_order_and_expands_globs_and_braces_inside_its_elements(shard_dir):
    urls = [
        str(shard_dir / "val-000000.tar"),
        str(shard_dir / "train-00000[23].tar"),
        str(shard_dir / "train-{000000..000001}.tar"),
    ]
    assert expand_urls(urls, "data.urls") == [str(shard_dir / "val-000000.tar"), *train_shards(shard_dir, 2, 3, 0, 1)]
    assert expand_urls(tuple(urls), "data.urls") == expand_urls(urls, "data.urls")


def test_an_omegaconf_list_config_is_a_list_of_shards(shard_dir):
    urls = OmegaConf.create({"urls": train_shards(shard_dir, 3, 0)}).urls
    assert isinstance(urls, ListConfig) and not isinstance(urls, list)
    assert expand_urls(urls, "data.urls") == train_shards(shard_dir, 3, 0)


def test_a_list_given_on_the_hydra_command_line_is_a_list_of_shards(shard_dir):
    a, b = train_shards(shard_dir, 0, 2)
    assert expand_urls(composed_urls(f"data.urls=[{a},{b}]"), "data.urls") == [a, b]


def test_a_quoted_brace_pattern_and_a_glob_survive_hydra_override_parsing(shard_dir):
    braces = composed_urls(f"data.urls='{shard_dir}/train-{{000000..000001}}.tar'")
    assert expand_urls(braces, "data.urls") == train_shards(shard_dir, 0, 1)
    assert expand_urls(composed_urls(f"data.urls={shard_dir}/train-*.tar"), "data.urls") == train_shards(
        shard_dir, 0, 1, 2, 3
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/shards/train-000000.tar?token=a*b",
        "http://example.com/data/[not-a-glob].tar",
        "s3://bucket/train-*.tar",
        "pipe:curl -s https://example.com/train-000000.tar?x=*",
    ],
)
def test_remote_urls_and_pipes_pass_through_untouched_and_are_never_globbed(url):
    assert expand_urls(url, "data.urls") == [url]
    assert expand_urls([url, url], "data.urls") == [url, url]


def test_remote_brace_patterns_expand_as_webdataset_would_expand_them():
    assert expand_urls("pipe:cat /d/train-{0..1}.tar", "data.urls") == ["pipe:cat /d/train-0.tar", "pipe:cat /d/train-1.tar"]


@pytest.mark.parametrize(
    ("urls", "shown"),
    [
        ("{dir}/nothing-*.tar", "nothing-*.tar"),
        ("{dir}/train-000009.tar", "train-000009.tar"),
        (["{dir}/train-000000.tar", "{dir}/absent.tar"], "absent.tar"),
        ("{dir}/train-{{000003..000004}}.tar", "train-000004.tar"),
    ],
    ids=["glob", "path", "list-element", "brace-range-past-the-end"],
)
def test_a_local_path_or_glob_that_matches_no_file_is_an_error_naming_the_key(shard_dir, urls, shown):
    urls = [u.format(dir=shard_dir) for u in urls] if isinstance(urls, list) else urls.format(dir=shard_dir)
    with pytest.raises(ValueError, match=r"data\.val_urls=.*" + shown.replace("*", r"\*") + ".*matches no file"):
        expand_urls(urls, "data.val_urls")


@pytest.mark.parametrize("urls", [[], (), ListConfig([])], ids=["list", "tuple", "ListConfig"])
def test_an_empty_list_is_an_error_naming_the_key(urls):
    with pytest.raises(ValueError, match=r"data\.urls=\[\] names no shard"):
        expand_urls(urls, "data.urls")


@pytest.mark.parametrize("urls", [42, [None], [""], ["/d/a.tar", 3]])
def test_something_that_is_not_a_url_is_an_error_naming_the_key(urls):
    with pytest.raises(ValueError, match=r"data\.urls"):
        expand_urls(urls, "data.urls")


# --- loader workers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_workers", "n_shards", "rank", "world_size", "expected"),
    [
        (4, 1, 0, 1, 1),  # one shard, one worker
        (4, 8, 0, 1, 4),  # enough shards: as configured
        (0, 8, 0, 1, 0),  # the main process stays the loader
        (4, 5, 0, 2, 3),  # ranks are dealt 3 and 2 of 5 shards
        (4, 5, 1, 2, 2),
        (2, 3, 2, 4, 1),  # the third of four ranks gets one of three shards ...
        (2, 3, 3, 4, 0),  # ... and the fourth none: no worker to start
    ],
)
def test_a_loader_gets_no_more_workers_than_the_shards_its_rank_reads(num_workers, n_shards, rank, world_size, expected):
    assert loader_workers(num_workers, n_shards, rank, world_size) == expected


@pytest.fixture(scope="module")
def qwen_processor(tiny_checkpoint):
    family = get_family("qwen2_vl")
    return family, load_processor(tiny_checkpoint("qwen2_vl"), family)


def data_module(qwen_processor, urls, num_workers: int) -> ShardDataModule:
    family, processor = qwen_processor
    return ShardDataModule(
        urls,
        processor,
        family.image_token,
        processor.tokenizer.pad_token_id,
        val_urls=urls,
        batch_major_keys=family.batch_major_image_keys,
        batch_size=2,
        max_seq_length=256,
        num_workers=num_workers,
        shuffle_buffer=0,
    )


@contextmanager
def stream_warnings_on_stderr() -> Iterator[None]:
    """Sends the stream's warnings to stderr, where DataLoader worker processes write too
    (pytest's log capture sees only this process)."""
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("vlm.data.stream")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def test_a_loader_over_one_shard_starts_one_worker_so_no_worker_goes_without_shards(
    qwen_processor, tmp_path, capfd, caplog
):
    (shard,) = write_shards(demo_samples(6, 0, 32), tmp_path, "train", 10)
    data = data_module(qwen_processor, str(shard), num_workers=4)
    with stream_warnings_on_stderr():
        # The check can fail: four workers over this one shard do warn, three times.
        plain = torch.utils.data.DataLoader(
            sample_stream(str(shard), shuffle_buffer=0, seed=0, repeat=False), batch_size=None, num_workers=4
        )
        assert len(list(plain)) == 6
        assert capfd.readouterr().err.count("got none of the 1 shard(s)") == 3

        with caplog.at_level(logging.INFO, logger="vlm.data.datamodule"):
            val = data.val_dataloader()
            train = data.train_dataloader()
        assert sum(len(batch["input_ids"]) for batch in val) == 6
        assert len(list(itertools.islice(train, 4))) == 4  # the one worker streams on, pass after pass
        assert "got none" not in capfd.readouterr().err

    assert val.num_workers == train.num_workers == 1
    assert "reads 1 of 1 shard(s): starting 1 DataLoader worker(s) instead of data.num_workers=4" in caplog.text
    assert {record.levelname for record in caplog.records if record.name == "vlm.data.datamodule"} == {"INFO"}


def test_enough_shards_keep_the_configured_workers_and_zero_workers_stay_zero(qwen_processor, tmp_path, caplog):
    paths = [str(p) for p in write_shards(demo_samples(6, 0, 32), tmp_path, "train", 1)]
    with caplog.at_level(logging.INFO, logger="vlm.data.datamodule"):
        assert data_module(qwen_processor, paths, num_workers=4).train_dataloader().num_workers == 4
        assert data_module(qwen_processor, paths[:1], num_workers=0).train_dataloader().num_workers == 0
    assert "instead of data.num_workers" not in caplog.text
