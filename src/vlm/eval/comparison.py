"""Fine-tuned runs (and the base model they started from) scored side by side on the same samples.

Runs of one base share its load: the base is loaded once, quantized exactly as the runs trained it
(:func:`~vlm.build.trained.load_base`), and each run's adapter is attached, scored and taken off
again (PEFT's ``unload``) before the next. Runs whose bases were loaded differently (another
checkpoint, another set of layers kept in 16-bit) get a load of their own. The base row is the
first run's base with no adapter. Each row is scored as its run validated: its processor, its
``max_seq_length``, its ``trainer.precision``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm.build.trained import RunDirError, TrainedRun, attach_adapter, load_base
from vlm.data.encoding import ConversationEncoder, EncoderSettings
from vlm.eval.answers import GenerationSettings
from vlm.eval.metrics import SHORT_ANSWER_WORDS, answers_are_short, median_words
from vlm.eval.recorded import recorded_setting
from vlm.eval.report import BASE, RUN, AnswerJudging, EvalReport, EvalRow, unique_names
from vlm.eval.samples import EvalSet, choose_samples
from vlm.eval.scoring import Batching, ModelScores, ScoringSettings, score_model

# (row name, samples in all) → a function told of each batch of samples scored.
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class ComparisonSettings:
    """``limit``: at most this many samples (all when None); ``answers``: judge answers (None: when
    the references are short, :func:`~vlm.eval.metrics.answers_are_short`); ``base``: add the base row."""

    batch_size: int = 8
    limit: int | None = None
    answers: bool | None = None
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=16))
    device: str = "cpu"
    base: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size={self.batch_size} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit={self.limit} must be at least 1")


def check_one_family(runs: Sequence[TrainedRun]) -> None:
    """:class:`RunDirError` unless every run fine-tuned a model of the first run's family."""
    first = runs[0]
    others = [run for run in runs[1:] if run.family.model_type != first.family.model_type]
    if others:
        listed = ", ".join(f"{run.run_dir} ({run.family.model_type})" for run in others)
        raise RunDirError(
            f"runs of different model families cannot be compared on one table: {first.run_dir} fine-tuned "
            f"{first.family.model_type}, but {listed}; evaluate each family on its own"
        )


def compare(
    runs: Sequence[TrainedRun], urls: Sequence[str], settings: ComparisonSettings, progress: Progress | None = None
) -> EvalReport:
    """Every run of ``runs`` (and its base first, with ``settings.base``) scored on the same samples of ``urls``."""
    from vlm.models.loading import load_processor

    if not runs:
        raise ValueError("no run to evaluate")
    check_one_family(runs)
    processors: dict[str, Any] = {}
    encoders: dict[tuple[str, int], ConversationEncoder] = {}
    for run in runs:
        if run.checkpoint not in processors:
            processors[run.checkpoint] = load_processor(run.checkpoint, run.family)
        key = (run.checkpoint, run.max_seq_length)
        if key not in encoders:
            encoding = EncoderSettings(max_seq_length=run.max_seq_length)
            encoders[key] = ConversationEncoder(processors[run.checkpoint], run.family.image_token, encoding)
    eval_set = choose_samples(urls, list(encoders.values()), settings.limit)
    judging = _judging(eval_set, settings)

    def scored(model: Any, run: TrainedRun, name: str) -> ModelScores:
        processor = processors[run.checkpoint]
        scoring = ScoringSettings(
            answers=judging.judged, generation=settings.generation, device=settings.device,
            precision=str(recorded_setting(run.run_dir, "trainer.precision", "32-true")),
        )
        on_samples = progress(name, len(eval_set)) if progress is not None else None
        return score_model(model, processor, encoders[(run.checkpoint, run.max_seq_length)],
                           Batching.of(run.family, processor, settings.batch_size), eval_set, scoring, on_samples)

    names = unique_names([run.run_dir for run in runs])
    rows: dict[int, EvalRow] = {}
    base_row: EvalRow | None = None
    for group in _by_base(runs):
        model = load_base(runs[group[0]], settings.device)
        if settings.base and group[0] == 0:
            base_row = EvalRow(BASE, BASE, str(runs[0].run_dir.resolve()), scored(model, runs[0], BASE))
        for index in group:
            run = runs[index]
            model = attach_adapter(model, run)
            try:
                rows[index] = EvalRow(names[index], RUN, str(run.run_dir.resolve()), scored(model, run, names[index]))
            finally:
                model = model.unload()  # the base again, for the next adapter
        del model
        _free_memory()
    ordered = ([base_row] if base_row is not None else []) + [rows[i] for i in range(len(runs))]
    return EvalReport(runs[0].family.model_type, tuple(urls), len(eval_set), judging, tuple(ordered), eval_set.skipped)


def _judging(eval_set: EvalSet, settings: ComparisonSettings) -> AnswerJudging:
    median = median_words(eval_set.references)
    words = f"median reference {median:g} word{'' if median == 1 else 's'}"
    if settings.answers is not None:
        judged, why = settings.answers, "--answers" if settings.answers else "--no-answers"
    elif answers_are_short(eval_set.references):
        judged, why = True, f"short answers: {words}, at most {SHORT_ANSWER_WORDS}"
    else:
        judged, why = False, f"long answers: {words}, over {SHORT_ANSWER_WORDS}; --answers judges them anyway"
    return AnswerJudging(judged, why, median, settings.generation.max_new_tokens)


def _base_key(run: TrainedRun) -> tuple[Any, ...]:
    """What the loaded base depends on: two runs with the same key can share one load."""
    return (run.checkpoint, run.family.model_type, run.quant, run.kept_in_16bit)


def _by_base(runs: Sequence[TrainedRun]) -> list[list[int]]:
    """Indices of ``runs`` grouped by the base they load, groups in order of their first run."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(_base_key(run), []).append(index)
    return list(groups.values())


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
