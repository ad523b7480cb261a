"""The LightningDataModule: WebDataset shards → samples → encoded, label-masked tensors → padded batches.

It needs only a processor (tokenizer, image processor, chat template), never the model. Samples
that cannot be used (undecodable, mismatched placeholders, nothing left to learn after
truncation) and shards that cannot be read are skipped and counted by reason; the counts travel
with the batches from the loader workers to the main process, where :attr:`ShardDataModule.skipped`
adds them up, and where a loader stops the run with a :class:`~vlm.data.records.DataError` when its
data is unusable (see :mod:`vlm.data.tally`).
"""

from __future__ import annotations

import atexit
import functools
import glob
import logging
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset.shardlists
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.utils import pytorch_worker_info

from .collate import collate
from .encoding import ConversationEncoder, EncoderSettings, EncodingError
from .records import RecordError
from .shards import decode_sample
from .stream import SkipCounter, logical_worker, raw_sample_stream, shards_for_rank
from .tally import EXAMPLES_KEY, MAX_SKIP_FRACTION_KEY, SKIPPED_KEY, DataSource, LoaderTally, TalliedLoader

_GLOB_CHARS = "*?["
# Key of a training item's stream position, (logical worker, pass, raw samples read): removed by
# the data module when the batch is trained on (see ShardDataModule.on_before_batch_transfer).
POSITION_KEY = "stream_position"
# Key of a training item's sample key (its ``__key__`` in the shards); a batch carries the list,
# which the data module keeps as ShardDataModule.batch_keys when the batch is trained on.
SAMPLE_KEYS_KEY = "sample_keys"
# A worker that skips this many samples in a row sends their counts in an item of its own (it takes
# a slot of a batch, which then holds one sample less), so the main process sees a stream of bad
# data soon enough to stop it, instead of after the worker's whole pass.
_REPORT_AFTER_SKIPS = 16

log = logging.getLogger(__name__)


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike], key: str) -> list[str]:
    """Every shard URL that ``urls`` names, in order, for the config key ``key`` (used in errors).

    ``urls`` is one string or a sequence of them (a list, a tuple, or the ``ListConfig`` Hydra
    makes of ``key='[a.tar,b.tar]'``); each is a path, a brace pattern (``train-{000000..000003}.tar``,
    ``::`` joins several), a glob (``train-*.tar``, sorted), an ``http(s)://``/``s3://``... URL or a
    ``pipe:`` command. Braces are expanded as WebDataset would; globs and existence are checked
    only for local paths: remote URLs and pipes go to WebDataset untouched.

    Raises:
        ValueError naming ``key``: no URL at all, an element that is not a string, or a local
        path or glob that matches no file.
    """
    if isinstance(urls, (str, os.PathLike)):
        patterns = [urls]
    elif isinstance(urls, Sequence):
        patterns = list(urls)
    else:
        raise ValueError(f"{key}={urls!r} must be a shard path, pattern or URL, or a list of them")
    expanded = [url for pattern in patterns for url in _expand_pattern(pattern, key)]
    if not expanded:
        raise ValueError(f"{key}={_shown(urls)} names no shard")
    return expanded


def _expand_pattern(pattern: Any, key: str) -> list[str]:
    if not isinstance(pattern, (str, os.PathLike)) or not os.fspath(pattern):
        raise ValueError(f"{key} holds {pattern!r}, which is not a shard path, pattern or URL")
    urls = webdataset.shardlists.expand_urls(os.fspath(pattern))
    return [path for url in urls for path in ([url] if _is_remote(url) else _local_files(url, pattern, key))]


def _is_remote(url: str) -> bool:
    """A URL WebDataset opens itself (``http://``, ``s3://``, ``pipe:cmd``...), not a local path."""
    return url.startswith("pipe:") or "://" in url


def _local_files(url: str, pattern: Any, key: str) -> list[str]:
    if any(ch in url for ch in _GLOB_CHARS):
        paths = sorted(path for path in glob.glob(url) if Path(path).is_file())
    else:
        paths = [url] if Path(url).is_file() else []
    if not paths:
        which = f"{pattern!r}" if os.fspath(pattern) == url else f"{pattern!r} (at {url!r})"
        raise ValueError(f"{key}={which} matches no file")
    return paths


def _shown(urls: Any) -> str:
    # A ListConfig's repr is its list's, so the user sees what they wrote.
    return repr(list(urls)) if isinstance(urls, Sequence) and not isinstance(urls, str) else repr(urls)


def loader_workers(num_workers: int, n_shards: int, rank: int = 0, world_size: int = 1) -> int:
    """DataLoader workers worth starting: no more than the shards ``rank`` of ``world_size`` reads.

    Shards are dealt whole, round-robin over ranks and then over a rank's workers, so a worker
    beyond the rank's shard count would only idle. Zero (load in the main process) stays zero.
    """
    return min(num_workers, shards_for_rank(n_shards, rank, world_size))


@dataclass(frozen=True)
class StreamPosition:
    """Where one DataLoader worker's training stream is: the pass it reads (its shuffles are
    seeded by it) and how many raw samples of that pass it has read, skipped ones included."""

    pass_index: int = 0
    consumed: int = 0


@dataclass(frozen=True)
class StreamResume:
    """Where each (logical) worker of a training stream resumes, and how its workers are renumbered
    so that the first batch comes from the worker whose turn it was (see
    :func:`vlm.data.stream.logical_worker`)."""

    positions: dict[int, StreamPosition] = field(default_factory=dict)
    worker_shift: int = 0


class EncodedSamples(IterableDataset):
    """Encoded samples from a shard stream; each carries the skips counted since the previous one.

    Decoding and encoding both happen here, in the loader worker, so a bad sample is skipped and
    counted wherever it fails. With ``repeat`` the shards are read pass after pass, but a pass
    that gives no usable sample ends the iteration: repeating it would spin forever. The counts
    no sample has carried yet end the iteration in an item of their own (``{SKIPPED_KEY: ...,
    EXAMPLES_KEY: ...}`` without ``input_ids``), so a worker that yields no sample at all still
    reports why.

    With ``track_position`` every item also carries its worker's :class:`StreamPosition` after it
    (``POSITION_KEY``) and its sample's key (``SAMPLE_KEYS_KEY``), and ``resume`` starts each
    worker where such a position says: the raw samples it had read are passed over before decoding.
    """

    def __init__(
        self,
        urls: list[str],
        encoder: ConversationEncoder,
        *,
        shuffle_buffer: int,
        seed: int,
        repeat: bool,
        track_position: bool = False,
        resume: StreamResume = StreamResume(),
    ):
        super().__init__()
        self.urls = urls
        self.encoder = encoder
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.track_position = track_position
        self.resume = resume

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            leave_sigterm_to_the_main_process()
        _, _, worker, num_workers = pytorch_worker_info()
        worker = logical_worker(worker, num_workers, self.resume.worker_shift)
        start = self.resume.positions.get(worker, StreamPosition())
        counter = SkipCounter()
        stream = raw_sample_stream(
            self.urls, shuffle_buffer=self.shuffle_buffer, seed=self.seed, skip_counter=counter,
            first_pass=start.pass_index, worker_shift=self.resume.worker_shift,
        )
        pass_index, skip = start.pass_index, start.consumed
        while True:
            usable = yield from self._one_pass(stream, counter, worker, pass_index, skip)
            # A resumed pass may have nothing left to give; only a whole pass without a sample is empty.
            if not self.repeat or (usable == 0 and skip == 0):
                break
            pass_index, skip = pass_index + 1, 0
        if counter.pending:
            yield self._tagged(skip_report(counter), worker, pass_index, None)

    def _one_pass(
        self, stream: Any, counter: SkipCounter, worker: int, pass_index: int, skip: int
    ) -> Generator[dict[str, Any], None, int]:
        """Yields the pass's encoded samples (and reports of long runs of skips), after passing over
        the first ``skip`` raw samples; returns how many samples it yielded."""
        usable = 0
        read = 0
        for raw in stream:
            read += 1
            if read <= skip:
                continue  # read before the run was resumed
            encoded = self._encoded(raw, counter)
            if encoded is not None:
                encoded.update(skip_report(counter))
                if self.track_position:
                    encoded[SAMPLE_KEYS_KEY] = raw["__key__"]
                usable += 1
                yield self._tagged(encoded, worker, pass_index, read)
            elif counter.pending >= _REPORT_AFTER_SKIPS:
                yield self._tagged(skip_report(counter), worker, pass_index, read)
        return usable

    def _tagged(self, item: dict[str, Any], worker: int, pass_index: int, read: int | None) -> dict[str, Any]:
        if self.track_position and read is not None:
            item[POSITION_KEY] = (worker, pass_index, read)
        return item

    def _encoded(self, raw: dict[str, Any], counter: SkipCounter) -> dict[str, Any] | None:
        """The tensors of one raw sample, or None when it is skipped (and counted)."""
        try:
            return self.encoder(decode_sample(raw))
        except (RecordError, EncodingError) as error:
            counter.add(error.reason, error, key=raw.get("__key__"), url=raw.get("__url__"))
            return None


def leave_sigterm_to_the_main_process() -> None:
    """In a DataLoader worker: ignore SIGTERM; the main process ends the worker.

    A scheduler's SIGTERM reaches every process of the job. The main process then checkpoints at
    the end of its step and stops, shutting its workers down; a worker that died of the signal
    first would make PyTorch stop the main process mid-step, with no checkpoint written. A worker
    left running when the main process exits is killed then (:func:`_kill_workers_at_exit`), and
    one whose main process died ends by itself (PyTorch's workers watch their parent).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@functools.cache
def _kill_workers_at_exit() -> None:
    """At exit, kill the daemonic children still running (loader workers a failed run left behind):
    multiprocessing would send them SIGTERM, which they ignore, and wait for them forever."""

    def kill_daemons() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill_daemons)  # after multiprocessing's own exit handler, so it runs first


def skip_report(counter: SkipCounter) -> dict[str, Any]:
    """The skips ``counter`` has not reported yet, as the keys a sample or batch carries them in."""
    counts, examples = counter.unreported()
    return {SKIPPED_KEY: counts, EXAMPLES_KEY: examples}


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards of image-text conversations for training and validation.

    ``urls``/``val_urls``: paths, brace patterns (``train-{000000..000099}.tar``), globs, URLs or
    lists of them (see :func:`expand_urls`); no ``val_urls`` means no validation.
    ``max_seq_length`` is in tokens, image tokens included. A loader starts at most
    ``num_workers`` workers, and no more than the shards its rank reads (:func:`loader_workers`).
    ``max_skip_fraction`` (0..1): a loader that has read at least
    :data:`~vlm.data.tally.MIN_SAMPLES_FOR_FRACTION` samples and skipped more than this fraction of
    them stops the run with a :class:`~vlm.data.records.DataError`, as does a pass over a loader's
    shards without any usable sample. :attr:`skipped` counts skips per reason over every loader,
    :attr:`delivered` the samples delivered in batches, :attr:`batch_keys` the keys (``__key__``)
    of the samples of the training batch being trained on.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        processor: Any,
        image_token: str,
        pad_token_id: int,
        val_urls: str | Sequence[str] | None = None,
        batch_major_keys: frozenset[str] = frozenset(),
        tile_mask_keys: frozenset[str] = frozenset(),
        batch_size: int = 1,
        val_batch_size: int | None = None,
        max_seq_length: int = 2048,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_skip_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        for key, value in (("data.batch_size", batch_size), ("data.val_batch_size", val_batch_size or 1)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be >= 0")
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer={shuffle_buffer!r} must be >= 0")
        if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, int | float):
            raise ValueError(f"{MAX_SKIP_FRACTION_KEY}={max_skip_fraction!r} must be a number from 0 to 1")
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"{MAX_SKIP_FRACTION_KEY}={max_skip_fraction!r} must be from 0 to 1")
        self.urls = expand_urls(urls, "data.urls")
        self.val_urls = expand_urls(val_urls, "data.val_urls") if val_urls is not None else None
        self.encoder = ConversationEncoder(processor, image_token, EncoderSettings(max_seq_length=max_seq_length))
        image_tokens = self.encoder.min_image_tokens()
        if max_seq_length <= image_tokens:
            raise ValueError(
                f"data.max_seq_length={max_seq_length} cannot hold one image: an image takes at least "
                f"{image_tokens} tokens with this processor, and the conversation needs room besides"
            )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.max_skip_fraction = float(max_skip_fraction)
        self.collate = partial(
            _collate_with_skips,
            pad_token_id=pad_token_id,
            batch_major_keys=frozenset(batch_major_keys),
            tile_mask_keys=frozenset(tile_mask_keys),
        )
        # Updated in place only: every loader's tally adds to this very Counter.
        self.skipped: Counter[str] = Counter()
        self._tallies: list[LoaderTally] = []
        self._positions: dict[int, StreamPosition] = {}  # per logical worker, of the batches trained on
        self._last_worker: int | None = None
        self.batch_keys: tuple[str, ...] = ()
        self._train_workers = 1
        self._restored: dict[str, Any] | None = None  # a checkpoint's stream state, for the next loader

    @property
    def delivered(self) -> int:
        """Samples delivered in batches so far, over every loader of this module."""
        return sum(tally.usable for tally in self._tallies)

    def _loader(self, urls: list[str], *, key: str, train: bool, batch_size: int) -> TalliedLoader:
        workers = self._workers_for(urls)
        if workers:
            _kill_workers_at_exit()
        if train:
            self._train_workers = max(workers, 1)  # the main process reads as one worker
        dataset = EncodedSamples(
            urls,
            self.encoder,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            repeat=train,
            track_position=train,
            resume=self._stream_resume(workers) if train else StreamResume(),
        )
        rank, world_size = pytorch_worker_info()[:2]
        source = DataSource(key, tuple(urls), shards_for_rank(len(urls), rank, world_size), repeat=train)
        tally = LoaderTally(source, self.max_skip_fraction, self.skipped)
        self._tallies.append(tally)
        return TalliedLoader(
            dataset,
            tally=tally,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> TalliedLoader:
        return self._loader(self.urls, key="data.urls", train=True, batch_size=self.batch_size)

    def val_dataloader(self) -> TalliedLoader | list:
        if self.val_urls is None:
            return []
        return self._loader(self.val_urls, key="data.val_urls", train=False, batch_size=self.val_batch_size)

    def stream_dataloader(self, urls: str | Sequence[str], key: str = "urls") -> TalliedLoader:
        """The batches of ``urls`` once, in shard order, unshuffled: for calibration and evaluation.
        ``key`` is the config key that named ``urls``, for messages."""
        return self._loader(expand_urls(urls, key), key=key, train=False, batch_size=self.batch_size)

    def _workers_for(self, urls: list[str]) -> int:
        rank, world_size = pytorch_worker_info()[:2]
        workers = loader_workers(self.num_workers, len(urls), rank, world_size)
        if workers < self.num_workers:
            log.info(
                "rank %d/%d reads %d of %d shard(s): starting %d DataLoader worker(s) instead of data.num_workers=%d",
                rank,
                world_size,
                shards_for_rank(len(urls), rank, world_size),
                len(urls),
                workers,
                self.num_workers,
            )
        return workers

    # ---- the training stream's position, for an exact resume
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Notes where the training stream of the batch about to be trained on was (Lightning
        calls this for the batch of the step, not for the one its fetcher holds ahead)."""
        keys = batch.pop(SAMPLE_KEYS_KEY, None)
        if keys is not None:
            self.batch_keys = tuple(keys)
        position = batch.pop(POSITION_KEY, None)
        if position is not None:
            worker, pass_index, consumed = position
            self._positions[worker] = StreamPosition(pass_index, consumed)
            self._last_worker = worker
        return batch

    def _stream_resume(self, workers: int) -> StreamResume:
        """Where a new training loader of ``workers`` workers starts: where the restored state says,
        when it was written with as many workers and ranks; else at the stream's start."""
        restored, self._restored = self._restored, None
        if restored is None:
            return StreamResume()
        world_size = pytorch_worker_info()[1]
        if (restored["workers"], restored["world_size"]) != (max(workers, 1), world_size):
            log.warning(
                "the checkpoint's data position is for %d worker(s) on %d rank(s), this run has %d on %d: "
                "the training stream starts from its beginning", restored["workers"], restored["world_size"],
                max(workers, 1), world_size,
            )
            return StreamResume()
        positions = {int(w): StreamPosition(*p) for w, p in restored["positions"].items()}
        self._positions = dict(positions)
        last = restored["last_worker"]
        shift = (last + 1) % max(workers, 1) if last is not None else 0
        return StreamResume(positions, shift)

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": dict(self.skipped),
            "stream": {
                "workers": self._train_workers,
                "world_size": pytorch_worker_info()[1],
                "positions": {str(w): [p.pass_index, p.consumed] for w, p in self._positions.items()},
                "last_worker": self._last_worker,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped.clear()
        self.skipped.update(state_dict.get("skipped", {}))
        self._restored = state_dict.get("stream")


def _collate_with_skips(items: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """One batch of the encoded samples among ``items``, with every item's skip report merged in;
    only the report when ``items`` holds no sample (the loader drops such a batch)."""
    skipped: Counter[str] = Counter()
    examples = []
    samples = []
    keys = []
    position = None
    for item in items:
        skipped.update(item.pop(SKIPPED_KEY, {}))
        examples.extend(item.pop(EXAMPLES_KEY, []))
        position = item.pop(POSITION_KEY, position)  # the batch's items come in stream order: the last one's
        if SAMPLE_KEYS_KEY in item:
            keys.append(item.pop(SAMPLE_KEYS_KEY))
        if "input_ids" in item:
            samples.append(item)
    batch = collate(samples, **kwargs) if samples else {}
    batch[SKIPPED_KEY] = dict(skipped)
    batch[EXAMPLES_KEY] = examples
    if keys:
        batch[SAMPLE_KEYS_KEY] = keys
    if position is not None:
        batch[POSITION_KEY] = position
    return batch
