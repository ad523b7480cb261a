"""Answers while training and `vlm-generate`: what a model says to the validation questions.

The demo set's questions have one-word answers of a kind the question names (a number for "how
many", yes or no for "is there", a colour, a shape). The demo run (100 steps) answers about a
third of them exactly, not far above guessing within the kind; what it has clearly learned is to
answer in kind, which its random-init base never does. The tests hold it to that, and to answering
through `vlm-generate` exactly as the same adapter answers in process.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composing import compose_small
from PIL import Image
from safetensors.torch import load_file

from vlm.build.trained import load_base, load_trained, read_run
from vlm.cli.generate import main as vlm_generate
from vlm.cli.train import train
from vlm.data.demo import COLOURS, NOTHING, SHAPES
from vlm.eval.answers import AnswerGenerator, GenerationSettings, Question, prompt_question, shown
from vlm.eval.metrics import exact_match
from vlm.training.generation import COLUMNS, first_questions, undisturbed

SHORT_RUN = [
    "data.val_batch_size=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "calibration.measure=false",
    "lora.dropout=0.1",  # training draws random numbers every step: a disturbed state would show
]
CLI_MAX_NEW_TOKENS = 64  # vlm-generate's default


# --------------------------------------------------------------------------- helpers
def kind_of(question: str) -> set[str] | None:
    """The answers of the kind a demo question asks for."""
    if question.startswith("how many"):
        return {str(n) for n in range(5)}
    if question.startswith("is there"):
        return {"yes", "no"}
    if question.startswith("what colour"):
        return set(COLOURS)
    if question.startswith("what shape"):
        return {*SHAPES, NOTHING}
    return None


def prompt_of(question: Question) -> str:
    return question.text.split("\n", 1)[1]


def write_questions(questions: list[Question], folder: Path) -> Path:
    """A ``--questions`` file of single-image prompts, with the images beside it as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, question in enumerate(questions):
        question.images[0].save(folder / f"{n}.png")
        lines.append(json.dumps({"image": f"{n}.png", "prompt": prompt_of(question), "id": question.key}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def answers_in(path: Path) -> list[str]:
    return [json.loads(line)["answer"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy machine threads spinning
    against other processes make them many times slower (as conftest's ``one_cpu_thread``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_questions(demo_run, one_thread) -> list[Question]:
    """The first single-turn questions of the demo run's validation shards, as `vlm-generate` asks them."""
    run = read_run(demo_run)
    asked = [q for q in first_questions(run.val_urls, 32) if len(q.messages) == 1][:16]
    # The same prompts rebuilt as `vlm-generate` builds them: one user turn, the image first.
    rebuilt = [prompt_question(prompt_of(q), q.images, key=q.key) for q in asked]
    assert [q.messages for q in rebuilt] == [q.messages for q in asked]
    return [Question(q.key, q.images, q.messages, a.reference) for q, a in zip(rebuilt, asked, strict=True)]


@pytest.fixture(scope="module")
def adapter_answers(demo_run, demo_questions) -> list[str]:
    """The trained adapter's greedy answers, in process."""
    model, processor = load_trained(read_run(demo_run))
    generator = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=CLI_MAX_NEW_TOKENS))
    return [generator(q).text for q in demo_questions]


@pytest.fixture(scope="module")
def demo_base(demo_run, one_thread):
    """The demo run's base alone (random init, NF4 as the run trained it)."""
    run = read_run(demo_run)
    from vlm.models.loading import load_processor

    return load_base(run), load_processor(run.checkpoint, run.family)


# --------------------------------------------------------------------------- while training
def offline_tables(offline_run: Path, wandb_data: Path) -> list[dict]:
    """Every answers table W&B wrote for the run: the run's media files and, where W&B (0.2x on)
    keeps a table's full content, with its media cells, the run-table artifact staged beside its data."""
    candidates = sorted(offline_run.glob("files/media/table/generation/answers_*.table.json"))
    candidates += sorted(p for p in (wandb_data / "artifacts" / "staging").glob("*") if p.is_file())
    tables = []
    for path in candidates:
        try:
            table = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError):
            continue  # a staged image
        if isinstance(table, dict) and table.get("columns") == list(COLUMNS):
            tables.append(table)
    return tables


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, one_thread):
    """The same 4-step run twice: answering 2 questions at steps 2 and 4 (logged to W&B offline),
    and without the answers; with what the first printed."""
    root = tmp_path_factory.mktemp("short-runs")
    shared = SHORT_RUN  # both under root, with one cache of the tiny model and the demo data
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))
        patch.setenv("NETRC", str(root / "no-netrc"))
        cfg = compose_small("train", root, *shared, "callbacks.generation.settings.num_samples=2",
                            "callbacks.generation.settings.every_n_steps=2", run="with")
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed):  # where the callback's console prints
            with_answers = train(cfg)
        without = train(compose_small("train", root, *shared, "logger=csv", "callbacks=default", run="without"))
    assert with_answers["status"] == without["status"] == "completed"
    return SimpleNamespace(root=root, cfg=cfg, printed=printed.getvalue(), with_answers=with_answers, without=without)


def test_answers_while_training_are_printed_and_logged_as_a_wandb_table_with_images(short_runs):
    questions = first_questions(short_runs.cfg.data.val_urls, 2)

    # Two generations (steps 2 and 4; the end of training is step 4 and is not answered twice).
    (offline,) = (short_runs.root / "with" / "wandb").glob("offline-run-*")
    tables = offline_tables(offline, short_runs.root / "wandb-data")
    final = max(tables, key=lambda table: len(table["data"]))
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in final["data"]]
    assert [(r["step"], r["key"]) for r in rows] == [(step, q.key) for step in (2, 4) for q in questions]
    assert [(r["question"], r["reference"]) for r in rows] == [(q.text, q.reference) for q in questions] * 2
    assert all(r["exact"] == (exact_match(r["answer"], r["reference"]) == 1.0) for r in rows)
    # The image cells are images of the samples (64-pixel PNGs), in the table whose media W&B keeps.
    image_column = COLUMNS.index("image")
    with_media = [t for t in tables if len(t["data"]) == len(rows) and isinstance(t["data"][0][image_column], dict)]
    assert with_media, "no logged table holds its image cells"
    images = [row[image_column] for row in with_media[0]["data"]]
    assert all(i["_type"] == "image-file" and i["format"] == "png" and (i["width"], i["height"]) == (64, 64)
               for i in images)

    # Printed per generation: the question, the answer, and the reference where they differ.
    blocks = re.split(r"^answers at step (\d+): \d+ of 2 exact$", short_runs.printed, flags=re.MULTILINE)[1:]
    assert [int(step) for step in blocks[::2]] == [2, 4]
    for block, step in zip(blocks[1::2], (2, 4), strict=True):
        lines = block.strip("\n").splitlines()[:2]
        for line, row in zip(lines, [r for r in rows if r["step"] == step], strict=True):
            said = shown(row["answer"], 40) or "(nothing)"
            verdict = "✓" if row["exact"] else f"✗ (reference: {row['reference']})"
            assert line == f"  {shown(row['question'], 60)} → {said} {verdict}"


def test_answering_while_training_changes_nothing_the_run_learns(short_runs):
    """The run with the answers and the run without: the same losses and the same adapter, with
    LoRA dropout drawing random numbers every step (a random state or a module mode left changed
    after the answers at step 2 would change steps 3 and 4)."""
    for key in ("first_train_loss", "last_train_loss", "initial_val_loss", "final_val_loss"):
        assert short_runs.with_answers[key] == short_runs.without[key], key
    ours, theirs = (load_file(short_runs.root / run / "adapter" / "adapter_model.safetensors")
                    for run in ("with", "without"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_undisturbed_puts_back_the_random_states_and_every_modules_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[2].eval()  # a part that trains in eval mode stays so

    def seed(n: int) -> None:
        torch.manual_seed(n), random.seed(n), np.random.seed(n)

    def draws() -> tuple:
        return torch.rand(3), random.random(), np.random.rand()

    seed(7)
    expected = draws()
    seed(7)
    with undisturbed(model):
        seed(123)
        draws()
        model.eval()
        assert not torch.is_grad_enabled()
    after = draws()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert [m.training for m in model] == [True, True, False] and model.training


# --------------------------------------------------------------------------- vlm-generate
def test_vlm_generate_answers_as_the_adapter_does_in_process_and_in_the_kind_asked_for(
    demo_run, demo_questions, adapter_answers, tmp_path, capsys
):
    questions = write_questions(demo_questions, tmp_path / "asked")
    out = tmp_path / "answers.jsonl"
    assert vlm_generate(["--run", str(demo_run), "--questions", str(questions), "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()

    assert answers_in(out) == adapter_answers
    # Streamed to the terminal as they came: the same text, one line per question.
    assert printed == [f"{prompt_of(q)} → {a}" for q, a in zip(demo_questions, adapter_answers, strict=True)]
    in_kind = [a in kind_of(prompt_of(q)) for q, a in zip(demo_questions, adapter_answers, strict=True)]
    exact = [a == q.reference for q, a in zip(demo_questions, adapter_answers, strict=True)]
    assert all(in_kind), list(zip(demo_questions, adapter_answers, strict=True))
    assert sum(exact) >= 2, exact


def test_vlm_generate_base_only_answers_with_the_runs_base_and_not_in_kind(
    demo_run, demo_questions, adapter_answers, tmp_path, capsys
):
    asked = demo_questions[:8]
    questions = write_questions(asked, tmp_path / "asked")
    out = tmp_path / "base.jsonl"
    argv = ["--questions", str(questions), "--output", str(out), "--max-new-tokens", "4"]
    assert vlm_generate(["--run", str(demo_run), "--base-only", *argv]) == 0
    base = answers_in(out)
    assert sum(a in kind_of(prompt_of(q)) for q, a in zip(asked, base, strict=True)) <= 1, base
    assert sum(a == b for a, b in zip(base, adapter_answers, strict=False)) <= 1
    # --model loads a base with the standard NF4 policy by default: how the demo run stored its base.
    assert vlm_generate(["--model", read_run(demo_run).checkpoint, *argv]) == 0
    assert answers_in(out) == base
    capsys.readouterr()


def test_vlm_generate_streams_the_answer_to_one_prompt_and_it_is_right(
    demo_run, demo_questions, adapter_answers, tmp_path, capsys
):
    """A question the adapter answers right in process is answered right by the command, word for word."""
    question = next(q for q, a in zip(demo_questions, adapter_answers, strict=True) if a == q.reference)
    image = tmp_path / "shapes.png"
    question.images[0].save(image)
    assert vlm_generate(["--run", str(demo_run), "--image", str(image), "--prompt", prompt_of(question)]) == 0
    assert capsys.readouterr().out == f"{question.reference}\n"


# --------------------------------------------------------------------------- decoding
def test_greedy_is_deterministic_and_sampling_repeats_with_its_seed(demo_base, demo_questions):
    model, processor = demo_base
    question = demo_questions[0]
    greedy = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=8))
    torch.manual_seed(1)
    first = greedy(question).text
    torch.manual_seed(2)
    assert greedy(question).text == first  # whatever the global random state

    def sampled(seed: int) -> str:
        settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, seed=seed)
        return AnswerGenerator(model, processor, settings)(question).text

    assert sampled(3) == sampled(3)
    assert len({sampled(seed) for seed in range(4)}) > 1  # and it does sample


def test_the_streamed_text_is_the_answer(demo_base, demo_questions):
    model, processor = demo_base
    for settings in (GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=12, do_sample=True)):
        generator = AnswerGenerator(model, processor, settings)
        for question in demo_questions[:3]:
            pieces: list[str] = []
            answer = generator(question, on_text=pieces.append)
            assert len(pieces) > 1 and "".join(pieces).strip() == answer.text


# --------------------------------------------------------------------------- errors
@pytest.fixture
def run_without_adapter(tmp_path) -> Path:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(
        {"family": "qwen2_vl", "checkpoint": str(tmp_path / "none"), "kept_in_16bit": [], "status": "failed"}))
    return run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], r"give --run RUN_DIR .* or --model CHECKPOINT"),
        (["--run", "{run}", "--image", "{tmp}/absent.png", "--prompt", "hi"], r"--image .*absent\.png: no such file"),
        (["--run", "{run}", "--image", "{tmp}/broken.png", "--prompt", "hi"],
         r"--image .*broken\.png: not a readable image \(unreadable image\)"),
        (["--run", "{run}", "--prompt", "hi"], r"--run: .*unfinished has no adapter"),
        (["--run", "{run}", "--questions", "{tmp}/q.jsonl"], r"--questions .*q\.jsonl line 2: image .*gone\.png: no such file"),
        (["--model", "m", "--base-only", "--prompt", "hi"], r"--base-only is for --run"),
        (["--run", "{run}", "--prompt", "hi", "--temperature", "0.5"], r"--temperature applies to sampling: add --sample"),
        (["--run", "{run}", "--prompt", "hi", "--top-p", "2"], r"--top-p: .*at most 1"),
    ],
)
def test_vlm_generate_refuses_in_one_line_naming_the_flag(argv, message, run_without_adapter, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    (tmp_path / "q.jsonl").write_text('{"image": "here.png", "prompt": "a"}\n{"image": "gone.png", "prompt": "b"}\n')
    argv = [a.format(run=run_without_adapter, tmp=tmp_path) for a in argv]
    assert vlm_generate(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("vlm-generate: error: ") and re.search(message, line), line
