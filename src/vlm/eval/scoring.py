"""One model scored on an :class:`~vlm.eval.samples.EvalSet`: its loss over the assistant tokens and,
where asked, its greedy answers judged by exact match and token F1.

The loss is the one validation logs: the model's own causal-LM loss of each batch (the mean over
the batch's supervised tokens, ``labels != -100`` after the one-token shift), weighted by that
token count, so the result is the mean over every supervised token of the set whatever the batch
size. Batches are built as the data module builds them: :class:`~vlm.data.encoding.ConversationEncoder`
then :func:`~vlm.data.collate.collate` with the family's settings.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm.data.collate import collate
from vlm.data.encoding import ConversationEncoder
from vlm.data.records import Sample
from vlm.eval.answers import AnswerGenerator, GenerationSettings, question_of
from vlm.eval.metrics import exact_match, token_f1
from vlm.eval.samples import EvalSet
from vlm.models.families import ModelFamily
from vlm.training.loss_tally import LossTally

# Lightning's mixed precisions and the autocast dtype each runs validation under.
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_SHOWN_ANSWERS = 5


@dataclass(frozen=True)
class Batching:
    """How samples become batches: the family's collation settings, the pad token, ``batch_size`` samples each."""

    pad_token_id: int
    batch_major_keys: frozenset[str]
    tile_mask_keys: frozenset[str]
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size={self.batch_size} must be at least 1")

    @classmethod
    def of(cls, family: ModelFamily, processor: Any, batch_size: int) -> Batching:
        return cls(processor.tokenizer.pad_token_id, family.batch_major_image_keys, family.tile_mask_keys, batch_size)

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(encoded, pad_token_id=self.pad_token_id, batch_major_keys=self.batch_major_keys,
                       tile_mask_keys=self.tile_mask_keys)


@dataclass(frozen=True)
class JudgedAnswer:
    key: str
    question: str
    reference: str
    answer: str
    exact_match: float
    token_f1: float


@dataclass(frozen=True)
class ModelScores:
    """What one model scored: ``tokens`` supervised tokens of ``samples`` samples, their mean ``loss``
    (nats per token), and the mean exact match and token F1 (0..1) of its answers when they were judged."""

    samples: int
    tokens: int
    loss: float
    exact_match: float | None = None
    token_f1: float | None = None
    seconds: float = 0.0
    examples: tuple[JudgedAnswer, ...] = field(default=(), compare=False)

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    """``exp(loss)``; infinite where that overflows, NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def autocast_for(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The autocast context Lightning validates a run of ``trainer.precision`` under (none for true precisions)."""
    dtype = _AUTOCAST_DTYPES.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's causal-LM loss of ``batch`` (already on the model's device)."""
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, dict):
        loss = outputs.get("loss")
    if loss is None:
        raise RuntimeError(f"{type(model).__name__} returned no loss; does it accept `labels`?")
    return loss


def chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class ScoringSettings:
    """What is scored: the loss always, answers when ``answers``, decoded with ``generation``, under
    ``trainer.precision`` ``precision`` (Lightning's name) on ``device``."""

    answers: bool
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    precision: str = "32-true"
    device: str = "cpu"


@torch.no_grad()
def score_model(
    model: torch.nn.Module,
    processor: Any,
    encoder: ConversationEncoder,
    batching: Batching,
    eval_set: EvalSet,
    settings: ScoringSettings,
    on_samples: Callable[[int], None] | None = None,
) -> ModelScores:
    """``model`` scored on every sample of ``eval_set``; ``on_samples(n)`` is told of each batch of ``n`` done."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tally = LossTally()
    generator = AnswerGenerator(model, processor, settings.generation) if settings.answers else None
    judged: list[JudgedAnswer] = []
    samples = 0
    try:
        for group in chunks(eval_set.samples(), batching.batch_size):
            batch = batching.collate([encoder(sample) for sample in group])
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_for(settings.precision, settings.device):
                tally.add(batch_loss(model, batch), batch["labels"])
                if generator is not None:
                    judged.extend(_judged(generator, sample) for sample in group)
            samples += len(group)
            if on_samples is not None:
                on_samples(len(group))
    finally:
        model.train(was_training)
    return ModelScores(
        samples=samples,
        tokens=tally.tokens,
        loss=tally.mean,
        exact_match=_mean([a.exact_match for a in judged]) if generator is not None else None,
        token_f1=_mean([a.token_f1 for a in judged]) if generator is not None else None,
        seconds=time.perf_counter() - started,
        examples=tuple(judged[:_SHOWN_ANSWERS]),
    )


def _judged(generator: AnswerGenerator, sample: Sample) -> JudgedAnswer:
    question = question_of(sample)
    reference = question.reference or ""
    answer = generator(question).text
    return JudgedAnswer(sample.key, question.text, reference, answer,
                        exact_match(answer, reference), token_f1(answer, reference))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


__all__ = [
    "Batching",
    "JudgedAnswer",
    "ModelScores",
    "ScoringSettings",
    "autocast_for",
    "batch_loss",
    "perplexity",
    "score_model",
]
