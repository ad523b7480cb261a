"""The LightningDataModule: WebDataset shards → samples → encoded, label-masked tensors → padded batches.

It needs only a processor (tokenizer, image processor, chat template), never the model. Samples
that cannot be used (undecodable, mismatched placeholders, nothing left to learn after
truncation) are skipped and counted by reason; the counts travel with the batches from the
loader workers to the main process, where :attr:`ShardDataModule.skipped` adds them up.
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from .collate import collate
from .encoding import ConversationEncoder, EncoderSettings, EncodingError
from .stream import SkipCounter, sample_stream

SKIPPED_KEY = "skipped_samples"


def expand_urls(urls: str | list[str], key: str) -> str | list[str]:
    """Globs become sorted lists of files; brace patterns and lists pass through to WebDataset."""
    if isinstance(urls, str) and any(ch in urls for ch in "*?["):
        paths = sorted(glob.glob(urls))
        if not paths:
            raise ValueError(f"{key}={urls!r} matches no file")
        return paths
    if isinstance(urls, (list, tuple)):
        return [str(u) for u in urls]
    return str(urls)


class EncodedSamples(IterableDataset):
    """Encoded samples from a shard stream; each carries the skips counted since the previous one."""

    def __init__(self, urls: str | list[str], encoder: ConversationEncoder, *, shuffle_buffer: int, seed: int, repeat: bool):
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

    ``urls``/``val_urls``: brace patterns (``train-{000000..000099}.tar``), globs or lists; no
    ``val_urls`` means no validation. ``max_seq_length`` is in tokens, image tokens included.
    """

    def __init__(
        self,
        urls: str | list[str],
        processor: Any,
        image_token: str,
        pad_token_id: int,
        val_urls: str | list[str] | None = None,
        batch_major_keys: frozenset[str] = frozenset(),
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
        self.val_urls = expand_urls(val_urls, "data.val_urls") if val_urls else None
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
        self.collate = partial(_collate_with_skips, pad_token_id=pad_token_id, batch_major_keys=frozenset(batch_major_keys))
        self.skipped: Counter[str] = Counter()

    def _loader(self, urls: str | list[str], *, train: bool, batch_size: int) -> DataLoader:
        dataset = EncodedSamples(
            urls, self.encoder, shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed, repeat=train
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.urls, train=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        return self._loader(self.val_urls, train=False, batch_size=self.val_batch_size)

    def stream_dataloader(self, urls: str | list[str]) -> DataLoader:
        """The batches of ``urls`` once, in shard order, unshuffled: for calibration and evaluation."""
        return self._loader(expand_urls(urls, "urls"), train=False, batch_size=self.batch_size)

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
