"""The samples an evaluation scores: read once to choose them, then streamed again for every model.

Every row of a comparison must score the same samples. They are chosen in one pass over the
shards, in shard order and unshuffled as validation reads them: a sample is kept when it decodes
and every encoder of the comparison (one per processor and sequence length) encodes it; the others
are skipped and counted by reason, as training counts them. Each model then streams the chosen
samples again, so memory holds one batch at a time, not the whole set with its images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from vlm.data.encoding import ConversationEncoder, EncodingError
from vlm.data.records import DataError, Sample, SkipCounter, SkippedSample
from vlm.data.stream import sample_stream
from vlm.eval.answers import question_of

# Reading the chosen samples again meets the same bad data, whose warnings were given the first time.
_ALREADY_WARNED = logging.getLogger(f"{__name__}.again")
_ALREADY_WARNED.disabled = True


@dataclass(frozen=True)
class EvalSet:
    """The chosen samples of ``urls``: their (shard, key) in reading order and their references
    (the last assistant turn's text); ``skipped`` counts per reason the samples left out (a shard
    that could not be read counts once)."""

    urls: tuple[str, ...]
    chosen: tuple[tuple[str | None, str], ...]
    references: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: tuple[SkippedSample, ...] = ()

    def __len__(self) -> int:
        return len(self.chosen)

    def samples(self) -> Iterator[Sample]:
        """The chosen samples, decoded again from the shards, in the order they were chosen."""
        wanted = set(self.chosen)
        remaining = len(wanted)
        if not remaining:
            return
        for sample in _read(self.urls, SkipCounter(_ALREADY_WARNED)):
            if (sample.url, sample.key) in wanted:
                yield sample
                remaining -= 1
                if not remaining:
                    return


def choose_samples(
    urls: Sequence[str], encoders: Sequence[ConversationEncoder], limit: int | None = None
) -> EvalSet:
    """The first ``limit`` samples of ``urls`` (all when None) that decode and that every encoder encodes.

    Raises:
        DataError: not one sample is usable; the message gives the counts per reason and examples.
    """
    counter = SkipCounter()
    chosen: list[tuple[str | None, str]] = []
    references: list[str] = []
    for sample in _read(urls, counter):
        try:
            for encoder in encoders:
                encoder(sample)
        except EncodingError as error:
            counter.add(error.reason, error, key=sample.key, url=sample.url)
            continue
        chosen.append((sample.url, sample.key))
        references.append(question_of(sample).reference or "")
        if limit is not None and len(chosen) >= limit:
            break
    if not chosen:
        examples = "; ".join(example.describe() for example in counter.examples[:3]) or "the shards hold no sample"
        raise DataError(f"no usable sample to evaluate in {len(urls)} shard(s) ({counter.as_dict()}): {examples}")
    return EvalSet(tuple(urls), tuple(chosen), tuple(references), counter.as_dict(), tuple(counter.examples))


def _read(urls: Sequence[str], counter: SkipCounter) -> Iterator[Sample]:
    # One pass, in shard order, in this process: every row then sees the same stream.
    return iter(sample_stream(
        list(urls), shuffle_buffer=0, seed=0, repeat=False, split_by_node=False, split_by_worker=False,
        skip_counter=counter,
    ))
