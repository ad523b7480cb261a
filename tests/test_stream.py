"""Specification of the WebDataset streaming pipeline."""

from __future__ import annotations

import itertools
import json
import logging
import pickle

import pytest
import torch.utils.data
import webdataset as wds
from PIL import Image

from vlm.data.records import Sample
from vlm.data.shards import encode_image, shard_pattern, write_shards
from vlm.data.stream import SkipCounter, sample_stream, shards_for_rank

N_SHARDS, PER_SHARD = 6, 5


def make_sample(i: int) -> Sample:
    image = Image.new("RGB", (4, 4), (i, 0, 0))
    messages = [{"role": "user", "content": f"<image>\nsample {i}?"}, {"role": "assistant", "content": str(i)}]
    return Sample(f"s{i:03d}", [image], messages)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Six shards of five samples each, keys s000..s029; returns their brace pattern."""
    out = tmp_path_factory.mktemp("stream")
    paths = write_shards((make_sample(i) for i in range(N_SHARDS * PER_SHARD)), out, "train", PER_SHARD)
    assert len(paths) == N_SHARDS
    return shard_pattern(paths)


ALL_KEYS = [f"s{i:03d}" for i in range(N_SHARDS * PER_SHARD)]


def keys(stream) -> list[str]:
    return [sample.key for sample in stream]


def test_one_pass_without_shuffling_yields_every_sample_once_in_shard_order(shards):
    stream = sample_stream(shards, shuffle_buffer=0, seed=0, repeat=False)
    samples = list(stream)
    assert [s.key for s in samples] == ALL_KEYS
    assert all(isinstance(s, Sample) and s.images[0].mode == "RGB" for s in samples)
    assert samples[7].messages[1]["content"] == "7"


def test_a_list_of_urls_with_brace_patterns_is_expanded(shards):
    first_half = shards.replace("000005", "000002")
    second_half = shards.replace("000000", "000003")
    assert keys(sample_stream([first_half, second_half], shuffle_buffer=0, seed=0, repeat=False)) == ALL_KEYS


def test_dataloader_workers_split_the_shards_so_each_sample_is_read_exactly_once(shards):
    stream = sample_stream(shards, shuffle_buffer=4, seed=3, repeat=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    assert sorted(keys(loader)) == ALL_KEYS


def test_shuffling_is_deterministic_for_a_seed_and_differs_between_seeds(shards):
    def order(seed: int) -> list[str]:
        return keys(sample_stream(shards, shuffle_buffer=8, seed=seed, repeat=False))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != ALL_KEYS
    assert sorted(order(1)) == ALL_KEYS


def test_ranks_partition_the_shards_between_them(shards, monkeypatch):
    # webdataset reads RANK/WORLD_SIZE from the environment, as torchrun sets them.
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(keys(sample_stream(shards, shuffle_buffer=8, seed=5, repeat=False)))
    assert len(seen[0]) == len(seen[1]) == len(ALL_KEYS) // 2
    assert sorted(seen[0] + seen[1]) == ALL_KEYS


@pytest.mark.parametrize("world_size", [1, 4, 7])
def test_shards_for_rank_counts_the_shards_the_stream_gives_that_rank(shards, monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        read = keys(sample_stream(shards, shuffle_buffer=8, seed=1, repeat=False))
        assert len(read) == PER_SHARD * shards_for_rank(N_SHARDS, rank, world_size)


def test_the_rank_is_pinned_when_the_pipeline_is_pickled_for_a_worker_process(shards, monkeypatch):
    # A spawned DataLoader worker sees no RANK and no torch.distributed; the pickled pipeline
    # must still read only its rank's shards.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = sample_stream(shards, shuffle_buffer=0, seed=0, repeat=False)
    rank1 = keys(stream)
    payload = pickle.dumps(stream)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert keys(pickle.loads(payload)) == rank1
    assert len(rank1) == len(ALL_KEYS) // 2
    # Pickled outside distributed training, nothing is pinned: it reads everything.
    assert keys(pickle.loads(pickle.dumps(sample_stream(shards, shuffle_buffer=0, seed=0, repeat=False)))) == ALL_KEYS


def test_an_infinite_stream_feeds_two_dataloader_workers_evenly(shards):
    stream = sample_stream(shards, shuffle_buffer=4, seed=1, repeat=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    taken = keys(itertools.islice(loader, 2 * len(ALL_KEYS)))
    assert sorted(taken) == sorted(ALL_KEYS * 2)


def test_a_worker_left_without_shards_says_so_and_yields_nothing(shards, monkeypatch, caplog):
    one_shard = shards.replace("{000000..000005}", "000000")
    monkeypatch.setenv("WORKER", "1")  # webdataset's override of the DataLoader worker info
    monkeypatch.setenv("NUM_WORKERS", "2")
    with caplog.at_level(logging.WARNING):
        assert keys(sample_stream(one_shard, shuffle_buffer=0, seed=0, repeat=True)) == []
    assert "worker 1/2 got none of the 1 shard(s)" in caplog.text


def test_repeat_streams_past_one_pass_and_reshuffles_each_pass(shards):
    stream = sample_stream(shards, shuffle_buffer=8, seed=0, repeat=True)
    taken = keys(itertools.islice(stream, 3 * len(ALL_KEYS)))
    passes = [taken[i * len(ALL_KEYS) : (i + 1) * len(ALL_KEYS)] for i in range(3)]
    assert all(sorted(p) == ALL_KEYS for p in passes)
    assert passes[0] != passes[1]


def test_bad_samples_are_skipped_counted_by_reason_and_logged_once_per_reason(tmp_path, caplog):
    good = encode_image(Image.new("RGB", (4, 4), (1, 2, 3)))
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]

    def meta(conversations) -> bytes:
        return json.dumps({"conversations": conversations}).encode()

    with wds.TarWriter(str(tmp_path / "mixed-000000.tar")) as tar:
        tar.write({"__key__": "good1", "json": meta(turns), "png": good})
        tar.write({"__key__": "corrupt1", "json": meta(turns), "png": b"not an image"})
        tar.write({"__key__": "corrupt2", "json": meta(turns), "png": good[:30]})
        tar.write({"__key__": "badjson", "json": b"{oops", "png": good})
        two_placeholders = meta([{"from": "human", "value": "<image><image>"}, turns[1]])
        tar.write({"__key__": "mismatch", "json": two_placeholders, "png": good})
        tar.write({"__key__": "good2", "json": meta(turns), "png": good})
    missing_shard = str(tmp_path / "absent-000000.tar")

    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        stream = sample_stream(
            [str(tmp_path / "mixed-000000.tar"), missing_shard],
            shuffle_buffer=0,
            seed=0,
            repeat=False,
            skip_counter=counter,
        )
        assert keys(stream) == ["good1", "good2"]
    assert counter.as_dict() == {"unreadable image": 2, "bad json": 1, "placeholder mismatch": 1, "unreadable shard": 1}
    assert counter.total == 5
    assert caplog.text.count("(unreadable image)") == 1
    assert "corrupt1" in caplog.text


def test_an_empty_url_list_is_an_error():
    with pytest.raises(ValueError, match="no shards"):
        sample_stream([], shuffle_buffer=0, seed=0, repeat=False)
