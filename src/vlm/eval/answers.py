"""A model's answers to the questions of samples: the prompt as training rendered it, then decoding.

A :class:`Question` is a sample cut before its last assistant turn, whose text is the reference.
The prompt is rendered by the processor's chat template with the generation prompt, exactly as
the encoder renders the prefix of that turn in training, so the model is asked what it learned
to answer. Decoding stops at the tokenizer's end token or at the template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlm.data.encoding import structured_messages
from vlm.data.records import IMAGE_PLACEHOLDER, Sample
from vlm.eval.metrics import exact_match

_TURN_PROBE = "zqxjv"


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are decoded: greedy unless ``do_sample``; ``seed`` makes sampling repeatable."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class Question:
    """A prompt (``messages`` ending with a user turn, with its images) and, where known, the reference answer."""

    key: str
    images: list[Image.Image]
    messages: list[dict[str, str]]
    reference: str | None = None

    @property
    def text(self) -> str:
        """The last user turn, for printing."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Answer:
    question: Question
    text: str
    new_tokens: int = field(default=0, compare=False)

    @property
    def exact(self) -> bool | None:
        """Whether the answer matches the reference as ``vlm-eval``'s exact match judges it (case,
        punctuation and articles aside, see :mod:`vlm.eval.metrics`); None without a reference."""
        reference = self.question.reference
        return None if reference is None else exact_match(self.text, reference) == 1.0


def question_of(sample: Sample) -> Question:
    """The sample up to its last assistant turn, whose content is the reference answer."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    return Question(sample.key, list(sample.images), list(sample.messages[:last]), sample.messages[last]["content"])


def questions_of(samples: Iterable[Sample]) -> Iterator[Question]:
    return (question_of(sample) for sample in samples)


def prompt_question(prompt: str, images: Sequence[Image.Image] = (), key: str = "prompt") -> Question:
    """One user turn: a placeholder per image first, each on its own line, then ``prompt`` (as the
    demo's and LLaVA-style samples put them)."""
    content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + prompt
    return Question(key, list(images), [{"role": "user", "content": content}])


def shown(text: str, width: int = 72) -> str:
    """``text`` on one line for a terminal: placeholders and control characters left out,
    whitespace runs as one space, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())
    flat = "".join(ch for ch in flat if ch.isprintable())  # a terminal would act on control characters
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class AnswerGenerator:
    """Answers :class:`Question` s with ``model`` (a Hugging Face model or a PEFT model around one)."""

    def __init__(self, model: torch.nn.Module, processor: Any, settings: GenerationSettings = GenerationSettings()):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.settings = settings
        self.stop_token_ids = stop_token_ids(processor)

    def prompt(self, question: Question) -> str:
        text = self.processor.apply_chat_template(
            structured_messages(question.messages), tokenize=False, add_generation_prompt=True
        )
        return text[0] if isinstance(text, list) else text

    def inputs(self, question: Question) -> dict[str, torch.Tensor]:
        text = self.prompt(question)
        bos = self.tokenizer.bos_token
        flag = bool(bos) and not text.startswith(bos)  # as the encoder does in training
        out = self.processor(
            text=[text], images=[question.images] if question.images else None, return_tensors="pt", add_special_tokens=flag
        )
        device = _device_of(self.model)
        return {k: v.to(device) for k, v in out.items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def __call__(self, question: Question, on_text: Callable[[str], None] | None = None) -> Answer:
        """The answer; ``on_text`` receives the answer's text piece by piece as it is decoded."""
        inputs = self.inputs(question)
        settings = self.settings
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            # Training turns the KV cache off in the config (it clashes with recomputed activations);
            # decoding wants it, and in eval mode checkpointing is off.
            "use_cache": True,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            torch.manual_seed(settings.seed)
        else:  # a checkpoint's generation config may ask for sampling settings that greedy ignores
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if on_text is not None:
            kwargs["streamer"] = _TextStream(self.tokenizer, on_text)
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(**inputs, **kwargs)
        finally:
            self.model.train(was_training)
        new = output[0, inputs["input_ids"].shape[1] :]
        return Answer(question, self.tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()))


def stop_token_ids(processor: Any) -> list[int]:
    """The tokenizer's end token and the special token the chat template closes a turn with."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        rendered = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": _TURN_PROBE}]}],
            tokenize=False,
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this probe: the end token alone
        return ids
    rendered = rendered[0] if isinstance(rendered, list) else rendered
    after = rendered[rendered.find(_TURN_PROBE) + len(_TURN_PROBE) :]
    following = tokenizer(after, add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder
    if following and following[0] in added and following[0] not in ids:
        ids.append(int(following[0]))
    return ids


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _TextStream:
    """A ``generate`` streamer that hands decoded text to a callback as it grows (prompt left out)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > len(self.shown) and not text.endswith("\ufffd"):  # a partial UTF-8 sequence waits
            self.on_text(text[len(self.shown) :])
            self.shown = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
        self.shown = text
