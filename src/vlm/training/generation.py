"""Answers to a few validation questions while a run trains: printed, and logged to W&B as a table.

Loss says how well a model predicts the reference; the answers it writes say what it learned.
:class:`ValidationAnswers` reads the first ``num_samples`` samples of the validation shards once,
when fitting starts, and answers their questions greedily every ``every_n_steps`` optimizer steps
and when training ends. Generating leaves training as it found it: the modules' train/eval modes,
the Python, NumPy and torch random states (a resumed run must draw the same numbers as an
uninterrupted one) and the gradients (nothing is recorded).
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import lightning
import numpy as np
import torch

from vlm.data.datamodule import expand_urls
from vlm.data.stream import sample_stream
from vlm.eval.answers import Answer, AnswerGenerator, GenerationSettings, Question, question_of, shown
from vlm.training.fsdp import uses_fsdp

log = logging.getLogger(__name__)

COLUMNS = ("step", "key", "image", "question", "reference", "answer", "exact")
# Tokens added to the longest reference when max_new_tokens is derived from the references.
_DERIVED_SLACK = 4


@dataclass(frozen=True)
class ValidationAnswerSettings:
    """Which questions, how often, and how long the answers may be.

    ``every_n_steps`` 0 or None answers only when training ends. ``max_new_tokens`` None: the longest
    reference's length in tokens plus a few, so a short-answer set decodes only as far as needed.
    """

    num_samples: int = 4
    every_n_steps: int | None = 50
    at_end: bool = True
    max_new_tokens: int | None = 16
    table_key: str = "generation/answers"
    print_answers: bool = True

    def __post_init__(self) -> None:
        key = "callbacks.generation.settings"
        if self.every_n_steps is None:  # as `trainer.val_check_interval=null` hands it down: no validation
            object.__setattr__(self, "every_n_steps", 0)
        if self.num_samples < 1:
            raise ValueError(f"{key}.num_samples={self.num_samples} must be at least 1")
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 0:
            raise ValueError(f"{key}.every_n_steps={self.every_n_steps} must be 0 (only at the end) or more")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"{key}.max_new_tokens={self.max_new_tokens} must be at least 1 (or null: derived)")


@contextmanager
def undisturbed(model: torch.nn.Module) -> Iterator[None]:
    """Runs the body without autograd and puts back what it may change for training: every module's
    train/eval mode and the Python, NumPy and torch (CPU and CUDA) random states."""
    modes = [(module, module.training) for module in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for module, training in modes:
            module.training = training


def first_questions(urls: Any, n: int, key: str = "data.val_urls") -> list[Question]:
    """The questions of the first ``n`` samples of ``urls``, in shard order (every sample, whatever
    the rank or worker: the same questions on every run of the same shards)."""
    stream = sample_stream(
        expand_urls(urls, key), shuffle_buffer=0, seed=0, repeat=False, split_by_node=False, split_by_worker=False
    )
    return [question_of(sample) for sample in islice(stream, n)]


class ValidationAnswers(lightning.Callback):
    """Generates answers to the first validation questions while training (rank zero only).

    ``processor`` is the run's processor (prompts are rendered as training renders them). Each time
    it prints the questions with their answers, marking the exact ones, and logs a ``wandb.Table``
    (``settings.table_key``) with the columns :data:`COLUMNS` to each W&B logger of the trainer: all
    rows so far, so the last table compares the steps side by side. The questions come from the
    data module's ``val_urls``; without validation shards, or with the weights sharded over the
    ranks (FSDP), nothing is generated.
    """

    def __init__(self, processor: Any, settings: ValidationAnswerSettings = ValidationAnswerSettings()) -> None:
        self.processor = processor
        self.settings = settings
        self.questions: list[Question] = []
        self.rows: list[list[Any]] = []  # the W&B table's rows, every generation so far
        self._images: list[Any] = []  # one wandb.Image per question, logged with every table
        self._last_step: int | None = None

    # ---- hooks
    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if uses_fsdp(trainer):
            # Each rank holds a shard of the weights: one rank cannot decode alone.
            log.info("the weights are sharded (FSDP): no answers are generated while training")
            return
        urls = getattr(trainer.datamodule, "val_urls", None)
        if not urls:
            log.info("no validation shards: no answers are generated while training")
            return
        with undisturbed(pl_module):  # reading the shards draws no random number today; nor may it later
            self.questions = first_questions(urls, self.settings.num_samples)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.settings.every_n_steps
        if every and trainer.global_step % every == 0 and trainer.global_step != self._last_step:
            self.generate_and_report(trainer, pl_module)

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if self.settings.at_end and trainer.global_step != self._last_step:
            self.generate_and_report(trainer, pl_module)

    # ---- generating
    def generate_and_report(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> list[Answer]:
        """Answers at the current step, printed and logged; none where this is not rank zero."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self.questions:
            return []
        model = getattr(pl_module, "model", pl_module)
        with trainer.precision_plugin.val_step_context():  # the dtype rules validation runs under
            answers = self.answers(model)
        if self.settings.print_answers:
            self._print(trainer.global_step, answers)
        self._log(trainer, answers)
        return answers

    def answers(self, model: torch.nn.Module) -> list[Answer]:
        """Greedy answers of ``model`` to :attr:`questions`, leaving the model as it was (see :func:`undisturbed`)."""
        settings = GenerationSettings(max_new_tokens=self._max_new_tokens())
        generator = AnswerGenerator(model, self.processor, settings)
        with undisturbed(model):
            return [generator(question) for question in self.questions]

    def _max_new_tokens(self) -> int:
        if self.settings.max_new_tokens is not None:
            return self.settings.max_new_tokens
        tokenizer = self.processor.tokenizer
        lengths = [len(tokenizer(q.reference or "", add_special_tokens=False)["input_ids"]) for q in self.questions]
        return max(lengths, default=0) + _DERIVED_SLACK

    # ---- reporting
    def _print(self, step: int, answers: list[Answer]) -> None:
        # Plain lines to stderr, not a console of our own: while the progress bar is live, rich
        # catches what is written to stderr and prints it above the bar; a second rich console
        # would write through it and break the bar's line.
        exact = sum(bool(a.exact) for a in answers)
        lines = [f"answers at step {step}: {exact} of {len(answers)} exact"]
        for answer in answers:
            reference = answer.question.reference
            said = shown(answer.text, 40) or "(nothing)"
            verdict = "✓" if answer.exact else f"✗ (reference: {shown(reference or '', 40)})"
            lines.append(f"  {shown(answer.question.text, 60)} → {said} {verdict}")
        print("\n".join(lines), file=sys.stderr, flush=True)

    def _log(self, trainer: lightning.Trainer, answers: list[Answer]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        import wandb

        if not self._images:
            self._images = [wandb.Image(q.images[0]) if q.images else None for q in self.questions]
        for answer, image in zip(answers, self._images, strict=True):
            question = answer.question
            self.rows.append(
                [trainer.global_step, question.key, image, question.text, question.reference, answer.text, answer.exact]
            )
        for logger in loggers:
            logger.log_table(self.settings.table_key, columns=list(COLUMNS), data=[list(r) for r in self.rows],
                             step=trainer.global_step)
