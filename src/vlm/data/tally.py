"""What each loader delivered and skipped, counted in the main process, and the checks that stop a
run on unusable data instead of letting it spin.

Loader workers skip bad samples and send their counts (and a first example of each reason) along
with the batches, or in batches of counts alone when a worker has skipped many in a row or ends
(see :class:`~vlm.data.datamodule.EncodedSamples`). :class:`TalliedLoader` takes those reports
off every batch before anyone sees it, drops the batches that hold nothing else, and raises a
:class:`~vlm.data.records.DataError` when

* an iteration of the loader ends without one usable sample (a full pass over its shards), or a
  loader that repeats forever (training) ends at all: then every worker's latest pass came up empty;
* more than ``max_skip_fraction`` of the samples it read were skipped, once at least
  :data:`MIN_SAMPLES_FOR_FRACTION` were read (so one bad first record does not stop a run).

Checking in the main process keeps the message whole with any number of workers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from .records import DataError, SkippedSample

# Keys of the skip reports in samples and batches (never model inputs: the loader removes them).
SKIPPED_KEY = "skipped_samples"  # {reason: count}
EXAMPLES_KEY = "skipped_examples"  # [SkippedSample], the first of each reason a worker met

MIN_SAMPLES_FOR_FRACTION = 20
MAX_SKIP_FRACTION_KEY = "data.max_skip_fraction"
_SHOWN_EXAMPLES = 3
_SHOWN_SHARDS = 5


@dataclass(frozen=True)
class DataSource:
    """The shards one loader reads: ``key`` is the config key that named them (for messages),
    ``urls`` every shard of it, ``rank_shards`` how many of them this rank reads, ``repeat``
    whether the loader streams forever (training) or reads one pass."""

    key: str
    urls: tuple[str, ...]
    rank_shards: int
    repeat: bool


class LoaderTally:
    """Usable and skipped samples of one loader, over all its iterations.

    ``totals`` is the data module's count per reason over every loader; each report is added to it too.
    """

    def __init__(self, source: DataSource, max_skip_fraction: float, totals: Counter[str]):
        self.source = source
        self.max_skip_fraction = max_skip_fraction
        self.totals = totals
        self.usable = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, SkippedSample] = {}

    @property
    def seen(self) -> int:
        """Samples read: the usable ones and every skip (a shard-level skip counts once)."""
        return self.usable + sum(self.skipped.values())

    def watch(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``batches`` without their skip reports and without the batches that held only a report.

        Raises:
            DataError: too many skips (checked with every batch), no usable sample in this
            iteration, or the end of a loader that should never end.
        """
        usable_before = self.usable
        for batch in batches:
            samples = self.take(batch)
            self.check_fraction()
            if samples:
                yield batch
        if self.usable == usable_before or self.source.repeat:
            raise DataError(self.no_usable_message())

    def take(self, batch: dict[str, Any]) -> int:
        """Count and remove the skip report of ``batch``; returns the samples it holds."""
        counts = batch.pop(SKIPPED_KEY, {})
        self.skipped.update(counts)
        self.totals.update(counts)
        for example in batch.pop(EXAMPLES_KEY, []):
            self.examples.setdefault(example.reason, example)
        samples = len(batch["input_ids"]) if "input_ids" in batch else 0
        self.usable += samples
        return samples

    def check_fraction(self) -> None:
        """Raise :class:`DataError` if more than ``max_skip_fraction`` of the samples read were skipped."""
        seen, skipped = self.seen, sum(self.skipped.values())
        if seen >= MIN_SAMPLES_FOR_FRACTION and skipped > self.max_skip_fraction * seen:
            raise DataError(self.fraction_message())

    # ---- messages ------------------------------------------------------------------------------
    def no_usable_message(self) -> str:
        key = self.source.key
        if self.usable == 0:
            head = f"no usable sample in a full pass over the shards of {key}"
        else:
            head = (
                f"the shards of {key} stopped giving usable samples: the latest pass over them gave none, "
                f"after {self.usable} usable sample(s) before it "
                "(were shards removed or rewritten while the run read them?)"
            )
        advice = (
            "Check these shards (each sample is KEY.json with a 'conversations' list, plus its image "
            f"KEY.jpg|png|webp), fix them or remove them from {key}, or write them anew with `vlm-shards convert`."
        )
        return self._message(head, advice)

    def fraction_message(self) -> str:
        seen, skipped = self.seen, sum(self.skipped.values())
        head = (
            f"too much unusable data in {self.source.key}: {skipped} of the {seen} samples read "
            f"({skipped / seen:.0%}) were skipped, more than {MAX_SKIP_FRACTION_KEY}={self.max_skip_fraction} allows"
        )
        advice = (
            f"Fix the bad shards or remove them from {self.source.key}, or raise {MAX_SKIP_FRACTION_KEY} "
            "(1 never stops a run)."
        )
        return self._message(head, advice)

    def _message(self, head: str, advice: str) -> str:
        lines = [f"{head}.", f"shards: {self._shards()}"]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()))
        else:
            lines.append("skipped: nothing; the shards hold no samples")
        examples = self._shown_examples()
        if examples:
            lines.append("for example:")
            lines.extend(f"  {example.describe()}" for example in examples)
        lines.append(advice)
        return "\n".join(lines)

    def _shards(self) -> str:
        urls = self.source.urls
        shown = ", ".join(urls[:_SHOWN_SHARDS]) + (
            f" and {len(urls) - _SHOWN_SHARDS} more" if len(urls) > _SHOWN_SHARDS else ""
        )
        noun = "shard" if len(urls) == 1 else "shards"
        text = f"{len(urls)} {noun}: {shown}"
        if self.source.rank_shards == 0:
            text += " (this rank reads none of them: write at least as many shards as there are ranks)"
        return text

    def _shown_examples(self) -> list[SkippedSample]:
        """One example of each of the most frequent reasons."""
        ranked = [self.examples[reason] for reason, _ in self.skipped.most_common() if reason in self.examples]
        return ranked[:_SHOWN_EXAMPLES]


class TalliedLoader(DataLoader):
    """A ``DataLoader`` whose batches pass through a :class:`LoaderTally` (see the module docstring)."""

    def __init__(self, dataset: Any, *, tally: LoaderTally, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.tally = tally

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.tally.watch(super().__iter__())


__all__ = [
    "EXAMPLES_KEY",
    "MIN_SAMPLES_FOR_FRACTION",
    "SKIPPED_KEY",
    "DataSource",
    "LoaderTally",
    "TalliedLoader",
]
