"""The LightningDataModule: WebDataset shards → samples → encoded, label-masked tensors → padded batches.

It needs only a processor (tokenizer, image processor, chat template), never the model. Samples
that cannot be used (undecodable, mismatched placeholders, nothing left to learn after
truncation) are skipped and counted by reason; the counts travel with the batches from the
loader workers to the main process, where :attr:`ShardDataModule.skipped` adds them up.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset.shardlists
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

from .collate import collate
from .encoding import ConversationEncoder, EncoderSettings, EncodingError
from .stream import SkipCounter, sample_stream, shards_for_rank

SKIPPED_KEY = "skipped_samples"
_GLOB_CHARS = "*?["

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


class EncodedSamples(IterableDataset):
    """Encoded samples from a shard stream; each carries the skips counted since the previous one."""

    def __init__(self, urls: list[str], encoder: ConversationEncoder, *, shuffle_buffer: int, seed: int, repeat: bool):
        super().__init__()
        self.urls = urls
        self.encoder = encoder
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat

    def __iter__(self) -> Iterator[dict[str, Any]]:
        counter = SkipCounter()
        stream = sample_stream(
            self.urls, shuffle_buffer=self.shuffle_buffer, seed=self.seed, repeat=self.repeat, skip_counter=counter
        )
        reported: Counter[str] = Counter()
        for sample in stream:
            try:
                encoded = self.encoder(sample)
            except EncodingError as error:
                counter.add(error.reason, str(error))
                continue
            now = Counter(counter.as_dict())
            encoded[SKIPPED_KEY] = dict(now - reported)
            reported = now
            yield encoded


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards of image-text conversations for training and validation.

    ``urls``/``val_urls``: paths, brace patterns (``train-{000000..000099}.tar``), globs, URLs or
    lists of them (see :func:`expand_urls`); no ``val_urls`` means no validation.
    ``max_seq_length`` is in tokens, image tokens included. A loader starts at most
    ``num_workers`` workers, and no more than the shards its rank reads (:func:`loader_workers`).
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
    ) -> None:
        super().__init__()
        for key, value in (("data.batch_size", batch_size), ("data.val_batch_size", val_batch_size or 1)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be >= 0")
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer={shuffle_buffer!r} must be >= 0")
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
        self.collate = partial(
            _collate_with_skips,
            pad_token_id=pad_token_id,
            batch_major_keys=frozenset(batch_major_keys),
            tile_mask_keys=frozenset(tile_mask_keys),
        )
        self.skipped: Counter[str] = Counter()

    def _loader(self, urls: list[str], *, train: bool, batch_size: int) -> DataLoader:
        dataset = EncodedSamples(
            urls, self.encoder, shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed, repeat=train
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=self._workers_for(urls),
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.urls, train=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        return self._loader(self.val_urls, train=False, batch_size=self.val_batch_size)

    def stream_dataloader(self, urls: str | Sequence[str]) -> DataLoader:
        """The batches of ``urls`` once, in shard order, unshuffled: for calibration and evaluation."""
        return self._loader(expand_urls(urls, "urls"), train=False, batch_size=self.batch_size)

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

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        self.skipped.update(batch.pop(SKIPPED_KEY, {}))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = Counter(state_dict.get("skipped", {}))


def _collate_with_skips(samples: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    skipped: Counter[str] = Counter()
    for sample in samples:
        skipped.update(sample.pop(SKIPPED_KEY, {}))
    batch = collate(samples, **kwargs)
    batch[SKIPPED_KEY] = dict(skipped)
    return batch
