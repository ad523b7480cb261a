"""The WebDataset streaming pipeline that yields :class:`~vlm.data.records.Sample` objects.

Stages, in order::

    shard urls -> [shuffle shards] -> split by rank -> split by DataLoader worker
               -> tar entries grouped by key -> [shuffle buffer of raw samples] -> decode

Shards are shuffled *before* splitting with the same seed on every rank and worker, so the
split is a partition: in one pass every shard, and so every sample, is read by exactly one
worker of one rank. Raw (still encoded) samples are shuffled, which keeps the buffer small,
and decoding comes last, where a bad sample is skipped and counted instead of crashing the run.
A shard that cannot be opened or read, or that is cut short, is counted too (once per pass),
and the samples before a cut are kept.

Splitting follows webdataset (``split_by_node`` then ``split_by_worker``): whole shards are dealt
round-robin. With fewer shards than ``world_size * num_workers`` some workers get none; they
log a warning and yield nothing (a DataLoader then simply reads the other workers, but under
DDP a rank that gets no shards at all yields no batches, so write at least ``world_size *
num_workers`` shards, ideally a multiple of it, to balance ranks; the data module stops such a
rank with a :class:`~vlm.data.records.DataError` saying so). The data module starts no
more workers than its rank has shards (:func:`shards_for_rank`), so in practice only a rank
without any shard warns.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import webdataset as wds
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.utils import PipelineStage, pytorch_worker_info

from vlm.data.records import REASON_UNREADABLE_SHARD, RecordError, Sample, SkipCounter
from vlm.data.shards import ShardError, decode_sample, read_samples

__all__ = ["SkipCounter", "raw_sample_stream", "sample_stream", "shards_for_rank"]

log = logging.getLogger(__name__)


def shards_for_rank(n_shards: int, rank: int, world_size: int) -> int:
    """How many of ``n_shards`` shards rank ``rank`` of ``world_size`` reads in one pass.

    Ranks are dealt shards round-robin (as :class:`_SplitShards` does), so the first
    ``n_shards % world_size`` ranks get one more than the others, and with fewer shards than
    ranks the last ranks get none.
    """
    if world_size <= 1:
        return n_shards
    return len(range(rank, n_shards, world_size))


def logical_worker(worker: int, num_workers: int, shift: int) -> int:
    """The worker whose share of the stream physical DataLoader worker ``worker`` reads.

    A DataLoader asks its workers for batches in turn, starting with worker 0. A resumed stream
    must go on with the worker whose turn came next, so its workers are renumbered by ``shift``:
    physical worker 0 reads the share of worker ``shift``, and so on.
    """
    return (worker + shift) % num_workers if num_workers > 1 else worker


class _ShuffleShards(PipelineStage):
    """Shuffles the shard list with ``Random(seed + pass)``.

    Every rank and worker holds a copy of this stage with the same seed and pass number, hence
    shuffles identically, which is what makes the following split a partition. The pass number
    advances each time the pipeline restarts (``repeat=True``), so each pass has a new order.
    """

    def __init__(self, seed: int, first_pass: int = 0):
        self.seed = seed
        self.passes = first_pass

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shards = list(src)
        random.Random(self.seed + self.passes).shuffle(shards)
        self.passes += 1
        return iter(shards)


class _SplitShards(PipelineStage):
    """Keeps this rank's and worker's share of the shards, warning when that share is empty.

    Shards are dealt round-robin, first over ranks (as ``webdataset.split_by_node`` does) and then
    over DataLoader workers (``webdataset.split_by_worker``). The rank is looked up in the rank's
    own process and pinned when the pipeline is pickled for a worker process: a worker started by
    spawn or forkserver sees neither an initialised ``torch.distributed`` nor (under Lightning's
    launcher) a ``RANK`` variable, and would otherwise read every rank's shards.
    """

    def __init__(self, by_node: bool, by_worker: bool, worker_shift: int = 0):
        self.by_node, self.by_worker = by_node, by_worker
        self.worker_shift = worker_shift
        self.node: tuple[int, int] | None = None  # (rank, world_size), pinned by __getstate__

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        rank, world_size = pytorch_worker_info()[:2]
        # Pin only a real distributed rank: a pipeline pickled before the process group exists
        # (e.g. by ddp_spawn) must still look its rank up later, in the rank's process.
        if state["node"] is None and world_size > 1:
            state["node"] = (rank, world_size)
        return state

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shards = list(src)
        rank, world_size, worker, num_workers = pytorch_worker_info()
        if self.node is not None:
            rank, world_size = self.node
        mine: Iterable[dict[str, Any]] = shards
        if self.by_node and world_size > 1:
            mine = islice(mine, rank, None, world_size)
        worker = logical_worker(worker, num_workers, self.worker_shift)
        if self.by_worker and num_workers > 1:
            mine = islice(mine, worker, None, num_workers)
        mine = list(mine)
        if shards and not mine:
            log.warning(
                "rank %d/%d, worker %d/%d got none of the %d shard(s) and yields no samples; "
                "write at least world_size * num_workers shards",
                rank,
                world_size,
                worker,
                num_workers,
                len(shards),
            )
        return iter(mine)


class _ShuffleSamples(PipelineStage):
    """A buffer shuffle whose RNG is seeded from (seed, pass, rank, worker).

    Unlike ``webdataset.shuffle`` (seeded from the clock) it repeats exactly for the same seed;
    mixing in rank and worker keeps workers from applying the same permutation pattern.
    """

    def __init__(self, bufsize: int, seed: int, first_pass: int = 0, worker_shift: int = 0):
        self.bufsize, self.seed = bufsize, seed
        self.passes = first_pass
        self.worker_shift = worker_shift

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rank, _, worker, num_workers = pytorch_worker_info()
        worker = logical_worker(worker, num_workers, self.worker_shift)
        rng = random.Random(f"{self.seed}/{self.passes}/{rank}/{worker}")
        self.passes += 1
        return self._shuffle(iter(src), rng)

    def _shuffle(self, src: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for item in src:
            if len(buffer) < self.bufsize:
                buffer.append(item)
                continue
            # Swap a random element out for the new one: each output is uniform over the buffer.
            i = rng.randrange(len(buffer))
            buffer[i], item = item, buffer[i]
            yield item
        rng.shuffle(buffer)
        yield from buffer


class _ReadShards(PipelineStage):
    """Shard URLs -> raw samples (see :func:`~vlm.data.shards.read_samples`).

    A shard that cannot be opened (a file gone since startup, a URL that fails) or read is counted
    as "unreadable shard", one that stops early as "truncated shard" with the samples before the
    cut kept; either way the stream goes on with the next shard. webdataset's own tar reader ends a
    cut file silently, which is why this stage replaces ``webdataset.tarfile_to_samples``.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            yield from self._samples(shard["url"])

    def _samples(self, url: str) -> Iterator[dict[str, Any]]:
        try:
            stream = gopen(url)  # webdataset's opener: paths, pipe:, http(s), s3 ...
        except Exception as exc:  # noqa: BLE001 - each kind of URL fails its own way
            self.counter.add(REASON_UNREADABLE_SHARD, f"cannot open shard {url} ({exc})", url=url)
            return
        try:
            yield from read_samples(stream, url)
        except ShardError as exc:
            self.counter.add(exc.reason, exc, url=url)
        finally:
            _close(stream)


def _close(stream: Any) -> None:
    try:
        stream.close()
    except (OSError, ValueError) as exc:
        # A pipe: command that failed closes with an error; what it did to the shard is counted already.
        log.debug("closing a shard stream: %s", exc)


class _DecodeSamples(PipelineStage):
    """Raw webdataset samples -> :class:`Sample`, skipping and counting bad ones."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[Sample]:
        for raw in src:
            try:
                yield decode_sample(raw)
            except RecordError as exc:
                self.counter.add(exc.reason, exc, key=raw.get("__key__"), url=raw.get("__url__"))


def raw_sample_stream(
    urls: str | list[str],
    *,
    shuffle_buffer: int,
    seed: int,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    skip_counter: SkipCounter | None = None,
    first_pass: int = 0,
    worker_shift: int = 0,
) -> wds.DataPipeline:
    """One pass of raw, undecoded samples (``{"__key__", "__url__", "json": bytes, ...}``) from tar
    shards; iterating it again reads the next pass (reshuffled). Arguments as :func:`sample_stream`;
    the caller decodes (:func:`~vlm.data.shards.decode_sample`) and counts bad samples itself.
    ``first_pass`` is the number of the first pass (its shuffles), ``worker_shift`` renumbers the
    DataLoader workers (see :func:`logical_worker`): both for resuming a stream where it was.
    """
    counter = skip_counter if skip_counter is not None else SkipCounter()
    stages = _read_stages(urls, shuffle_buffer, seed, split_by_node, split_by_worker, counter, first_pass, worker_shift)
    return wds.DataPipeline(*stages)


def _read_stages(
    urls: str | list[str],
    shuffle_buffer: int,
    seed: int,
    split_by_node: bool,
    split_by_worker: bool,
    counter: SkipCounter,
    first_pass: int = 0,
    worker_shift: int = 0,
) -> list[Any]:
    """The pipeline's stages up to (not including) decoding."""
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    expanded = [url for pattern in ([urls] if isinstance(urls, str) else urls) for url in expand_urls(pattern)]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    shuffling = shuffle_buffer > 0
    stages = [
        wds.SimpleShardList(expanded),
        _ShuffleShards(seed, first_pass) if shuffling else None,
        _SplitShards(split_by_node, split_by_worker, worker_shift),
        _ReadShards(counter),
        _ShuffleSamples(shuffle_buffer, seed, first_pass, worker_shift) if shuffling else None,
    ]
    return [stage for stage in stages if stage is not None]


def sample_stream(
    urls: str | list[str],
    *,
    shuffle_buffer: int,
    seed: int,
    repeat: bool,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    skip_counter: SkipCounter | None = None,
) -> wds.DataPipeline:
    """A pipeline (a torch ``IterableDataset``) yielding :class:`Sample` objects from tar shards.

    Args:
        urls: a shard path/URL, a brace pattern such as ``"dir/train-{000000..000007}.tar"``
            (``::`` joins several), or a list of them.
        shuffle_buffer: > 0 shuffles the shard order and then samples through a buffer of this many
            raw samples, deterministically from ``seed``; 0 reads shards and samples in order.
        seed: shuffling seed; the same seed gives the same order (for the same world size and
            number of workers).
        repeat: ``True`` restarts the pipeline forever (each pass reshuffled) -- for training with
            ``max_steps``, where Lightning never sees an epoch end (so validate every N steps with
            an integer ``val_check_interval`` and ``check_val_every_n_epoch=None``). ``False`` reads
            one pass, for validation (use ``shuffle_buffer=0`` there).
        split_by_node: give each distributed rank its share of the shards, as ``webdataset.split_by_node``
            does (rank from ``RANK``/``WORLD_SIZE`` or the initialised ``torch.distributed``).
        split_by_worker: give each DataLoader worker its share of the rank's shards.
        skip_counter: where skipped samples are counted per reason; one is created if omitted.
            Each reason is logged once as a warning. Counts made in DataLoader worker processes
            stay in those processes.

    Returns:
        A ``webdataset.DataPipeline``; wrap it in ``torch.utils.data.DataLoader`` (it yields single
        samples, so batch with a collate function or ``batch_size``).
    """
    counter = skip_counter if skip_counter is not None else SkipCounter()
    stages = _read_stages(urls, shuffle_buffer, seed, split_by_node, split_by_worker, counter)
    pipeline = wds.DataPipeline(*stages, _DecodeSamples(counter))
    if repeat:
        # DataPipeline.repeat() stops by itself if a pass yields nothing, so a worker without
        # shards (or with only bad samples) ends instead of spinning forever.
        pipeline = pipeline.repeat()
    return pipeline
