"""``vlm-generate``: answer a prompt about an image with a trained run, or with a base model alone.

    vlm-generate --run RUN_DIR --image cat.png --prompt "what colour is the cat ?"
    vlm-generate --run RUN_DIR --base-only --questions questions.jsonl --output answers.jsonl
    vlm-generate --model CHECKPOINT [--family qwen2_vl] [--quant nf4|fp4|int8|none] --image a.png --prompt "..."

With ``--run`` the base is loaded quantized exactly as the run trained it and the run's adapter is
put on it (``--base-only`` leaves the adapter off); with ``--model`` a base alone is loaded with
the standard quantization policy of ``--quant`` (NF4 unless told). The prompt becomes one user turn
with an image placeholder per image first, rendered by the chat template as training renders it.
The answer is streamed to stdout as it is decoded. A ``--questions`` file holds one JSON object a
line, ``{"image": "a.png", "prompt": "..."}`` (or ``"images": [...]``; relative paths are relative
to the file's folder); each answer is printed on its own line, after its prompt, and ``--output``
writes every record back with its ``"answer"``. Greedy unless ``--sample``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from vlm.errors import ConfigError

from . import console
from .arguments import positive_float, positive_int

if TYPE_CHECKING:
    from torch import nn

    from vlm.eval.answers import GenerationSettings, Question

PROG = "vlm-generate"


class UsageError(ConfigError):
    """A flag that cannot work as given; the message names it."""


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line and exit status 2 like every other error here."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)
def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Answer prompts about images with a trained run or a base model.")
    model = parser.add_argument_group("model (give --run or --model)")
    model.add_argument("--run", type=Path, metavar="RUN_DIR", help="a vlm-train run directory: its base and adapter")
    model.add_argument("--base-only", action="store_true", help="with --run: the run's base, without the adapter")
    model.add_argument("--model", metavar="CHECKPOINT", help="a base checkpoint (directory or hub id), no adapter")
    model.add_argument("--family", help="with --model: its model_type (default: read from its config)")
    model.add_argument("--quant", choices=("nf4", "fp4", "int8", "none"),
                       help="with --model: how its linear layers are stored (standard policy; default nf4)")
    asked = parser.add_argument_group("what to answer (give --prompt or --questions)")
    asked.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                       help="an image the prompt is about (repeat for several)")
    asked.add_argument("--prompt", help="the question or instruction")
    asked.add_argument("--questions", type=Path, metavar="FILE.jsonl",
                       help='one {"image" or "images": ..., "prompt": ...} object per line')
    asked.add_argument("--output", type=Path, metavar="ANSWERS.jsonl",
                       help="with --questions: write each record with its answer")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=positive_int, default=64, help="answer length limit (default 64)")
    decoding.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=positive_float, help="with --sample (default 1.0)")
    decoding.add_argument("--top-p", type=_top_p, help="with --sample: nucleus mass (default 1.0)")
    decoding.add_argument("--seed", type=int, default=0, help="with --sample: the seed, so answers repeat (default 0)")
    parser.add_argument("--device", help="where the model runs (default: cuda:0 when there is a GPU, else cpu)")
    return parser


# --------------------------------------------------------------------------- what is asked
@dataclass(frozen=True)
class Asked:
    """The questions, and the JSONL records they came from (None for ``--prompt``)."""

    questions: list[Question]
    records: list[dict[str, Any]] | None = None


def read_image(path: Path, flag: str) -> Any:
    """``path`` decoded as training decodes images (RGB, upright); :class:`UsageError` naming ``flag``."""
    from vlm.data.images import decode_rgb
    from vlm.data.records import RecordError

    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return decode_rgb(path.read_bytes(), str(path))
    except RecordError as error:
        raise UsageError(f"{flag} {path}: not a readable image ({error.reason})") from None


def asked_of(args: argparse.Namespace) -> Asked:
    from vlm.eval.answers import prompt_question

    if args.questions is None:
        if args.prompt is None:
            raise UsageError("give --prompt (with --image) or --questions FILE.jsonl")
        if args.output is not None:
            raise UsageError("--output writes the answers of --questions; with --prompt the answer is printed")
        images = [read_image(path, "--image") for path in args.image]
        return Asked([prompt_question(args.prompt, images)])
    if args.prompt is not None or args.image:
        raise UsageError("--questions holds its own prompts and images: give it without --prompt and --image")
    return read_questions(args.questions)


def read_questions(path: Path) -> Asked:
    """The questions of a JSONL file; :class:`UsageError` naming ``--questions``, the line and the problem."""
    from vlm.eval.answers import prompt_question

    if not path.is_file():
        raise UsageError(f"--questions {path}: no such file")
    questions, records = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--questions {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f'{where}: needs an object with a "prompt" string')
        names = record.get("images", [record["image"]] if "image" in record else [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise UsageError(f'{where}: "image" must be a path, "images" a list of paths')
        images = [read_image(path.parent / name, f"{where}: image") for name in names]
        questions.append(prompt_question(record["prompt"], images, key=str(record.get("id", number))))
        records.append(record)
    if not questions:
        raise UsageError(f"--questions {path}: holds no question")
    return Asked(questions, records)


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    from vlm.eval.answers import GenerationSettings

    if not args.sample:
        given = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p)) if value]
        if given:
            raise UsageError(f"{given[0]} applies to sampling: add --sample")
        return GenerationSettings(max_new_tokens=args.max_new_tokens)
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=args.temperature or 1.0,
        top_p=args.top_p or 1.0,
        seed=args.seed,
    )


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Loaded:
    model: nn.Module
    processor: Any
    described: str  # what answers, for the line printed before the answers


def check_model_flags(args: argparse.Namespace) -> None:
    if (args.run is None) == (args.model is None):
        raise UsageError("give --run RUN_DIR (a trained run) or --model CHECKPOINT (a base alone), one of them")
    if args.run is not None:
        for flag, value in (("--family", args.family), ("--quant", args.quant)):
            if value is not None:
                raise UsageError(f"{flag} is for --model: a run's base is loaded as the run trained it")
    elif args.base_only:
        raise UsageError("--base-only is for --run (a --model is a base alone already)")


def load_answering_model(args: argparse.Namespace, device: str) -> Loaded:
    """The model the flags name, on ``device``, with its processor."""
    if args.run is not None:
        return _from_run(args.run, args.base_only, device)
    return _from_checkpoint(args.model, args.family, args.quant or "nf4", device)


def _from_run(run_dir: Path, base_only: bool, device: str) -> Loaded:
    from vlm.build.trained import load_base, load_trained, read_run
    from vlm.models.loading import load_processor

    try:
        run = read_run(run_dir)
        if base_only:
            model, processor = load_base(run, device), load_processor(run.checkpoint, run.family)
        else:
            run.adapter_settings()  # refuses a run without an adapter before any weight loads
            model, processor = load_trained(run, device)
    except ConfigError as error:
        raise UsageError(f"--run: {error}") from None
    which = "the base alone" if base_only else "the adapter"
    return Loaded(model, processor, f"{run_dir}: {which} on {run.checkpoint} ({_quant_name(run.quant)}), {device}")


def _from_checkpoint(checkpoint: str, family_name: str | None, method: str, device: str) -> Loaded:
    from vlm.models import loading
    from vlm.models.families import get_family
    from vlm.quant.config import QuantConfig

    try:
        family = get_family(family_name or _model_type(checkpoint))
        quant = QuantConfig(method=method)
        model, _ = loading.load_model(checkpoint, family, quant, device=device)
        processor = loading.load_processor(checkpoint, family)
    except ValueError as error:  # another family's checkpoint, an unknown family
        flag = "--family" if family_name else "--model"
        raise UsageError(f"{flag}: {error}") from None
    except OSError as error:  # no such directory or hub id
        raise UsageError(f"--model {checkpoint}: cannot be loaded ({error})") from None
    return Loaded(model, processor, f"{checkpoint} ({_quant_name(quant)}), {device}")


def _model_type(checkpoint: str) -> str:
    import transformers

    return transformers.AutoConfig.from_pretrained(checkpoint).model_type


def _quant_name(quant: Any) -> str:
    return quant.method if quant.quantizes else "16-bit"


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- answering
def answer_all(loaded: Loaded, asked: Asked, settings: GenerationSettings) -> list[str]:
    """Every answer, streamed to stdout as decoded: a prompt alone prints only its answer, a
    questions file one ``prompt → answer`` line per question (line breaks shown as spaces)."""
    from vlm.eval.answers import AnswerGenerator, shown

    generator = AnswerGenerator(loaded.model, loaded.processor, settings)
    one_line = asked.records is not None
    texts = []
    for question in asked.questions:
        if one_line:
            _write(f"{shown(question.text)} → ")
        stream = _AnswerStream(one_line)
        texts.append(generator(question, on_text=stream).text)
        _write("\n")
    return texts


class _AnswerStream:
    """Writes an answer's pieces as they come, as the final answer reads: the whitespace it starts
    or ends with left out (a space is written only once text follows it)."""

    def __init__(self, one_line: bool) -> None:
        self.one_line = one_line
        self.started = False
        self.held = ""  # whitespace that is written only if more text follows

    def __call__(self, piece: str) -> None:
        if self.one_line:
            piece = " ".join(piece.split("\n"))
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body):]
        _write(body)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def write_answers(path: Path, records: list[dict[str, Any]], texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record, text in zip(records, texts, strict=True):
            out.write(json.dumps({**record, "answer": text}, ensure_ascii=False) + "\n")


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_model_flags(args)
    settings = generation_settings(args)
    asked = asked_of(args)  # every image is read before any weight loads
    device = args.device or default_device()
    loaded = load_answering_model(args, device)
    print(f"{PROG}: {loaded.described}", file=sys.stderr)
    texts = answer_all(loaded, asked, settings)
    if args.output is not None and asked.records is not None:
        write_answers(args.output, asked.records, texts)
        print(f"{PROG}: {len(texts)} answers → {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 answered, 2 a flag or input that cannot work)."""
    console.quiet_libraries()
    try:
        return run(argv)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
