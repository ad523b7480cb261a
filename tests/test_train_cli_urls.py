"""`vlm-train data.urls=[A,B]` on the real command line: Hydra's list reaches the data module and both shards are read."""

from __future__ import annotations

import pytest
from composing import train_on_shards

from vlm.data.demo import demo_samples
from vlm.data.encoding import REASON_TOO_LONG
from vlm.data.records import Sample
from vlm.data.shards import write_shards

MAX_SEQ_LENGTH = 128


def too_long_to_learn(key: str) -> Sample:
    """A text-only sample whose question fills the whole context, leaving its answer cut off."""
    question = " ".join(["how many shapes are there ?"] * MAX_SEQ_LENGTH)
    return Sample(key, [], [{"role": "user", "content": question}, {"role": "assistant", "content": "3"}])


@pytest.mark.slow
def test_a_list_of_shards_on_the_command_line_trains_on_every_shard_of_it(tmp_path):
    # Shard A holds only a sample that is skipped (and counted), shard B only learnable ones:
    # a run that both counts a skip and trains has read both. One worker reads both shards in
    # order, so A's skip travels to the main process with B's first sample.
    (shard_a,) = write_shards([too_long_to_learn("a-too-long")], tmp_path / "shards", "a", 10)
    (shard_b,) = write_shards(demo_samples(4, 0, 32), tmp_path / "shards", "b", 10)
    metrics = train_on_shards(
        tmp_path, [shard_a, shard_b], f"data.max_seq_length={MAX_SEQ_LENGTH}", "trainer.val_check_interval=1"
    )
    assert metrics["status"] == "completed" and metrics["steps"] == 2
    assert metrics["total_samples"] == 8  # two batches of B's four samples
    assert metrics["skipped_samples"].get(REASON_TOO_LONG, 0) >= 1  # A's sample, read and skipped
