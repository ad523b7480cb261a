"""Specification of the demo visual-question data set.

The answers are checked against what is actually drawn: a small pixel-level "perception" below
finds each quadrant's shape and colour from the image alone.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from vlm.cli.shards import main
from vlm.data.demo import (
    BACKGROUND,
    COLOURS,
    DEMO_VOCABULARY,
    POSITIONS,
    demo_samples,
    write_demo_shards,
)
from vlm.data.records import IMAGE_PLACEHOLDER
from vlm.data.stream import sample_stream

N = 300


def perceive(image: Image.Image) -> dict[str, tuple[str, str]]:
    """{position: (shape, colour)} for every quadrant that holds a shape, from pixels only."""
    size = image.width // 2
    found = {}
    for cell, position in enumerate(POSITIONS):
        row, column = divmod(cell, 2)
        quadrant = image.crop((column * size, row * size, (column + 1) * size, (row + 1) * size))
        data = list(quadrant.getdata())
        points = [i for i, rgb in enumerate(data) if rgb != BACKGROUND]
        if not points:
            continue
        (colour,) = {data[i] for i in points}  # one solid colour per quadrant
        xs, ys = [i % size for i in points], [i // size for i in points]
        fill = len(points) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
        name = next(n for n, rgb in COLOURS.items() if rgb == colour)
        found[position] = (shape, name)
    return found


def expected_answer(question: str, scene: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(kind of question, its answer), computed independently from the perceived scene."""
    items = list(scene.values())
    if question == "how many shapes are there ?":
        return "count", str(len(items))
    if m := re.fullmatch(r"how many (\w+) shapes are there \?", question):
        return "count colour", str(sum(colour == m[1] for _, colour in items))
    if m := re.fullmatch(r"what colour is the shape in the (.+) \?", question):
        return "colour at", scene[m[1]][1]
    if m := re.fullmatch(r"what shape is in the (.+) \?", question):
        return "shape at", scene[m[1]][0] if m[1] in scene else "nothing"
    if m := re.fullmatch(r"what colour is the (\w+) \?", question):
        (colour,) = [c for s, c in items if s == m[1]]  # asked only when that shape is unique
        return "colour of shape", colour
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", question):
        return "exists", "yes" if (m[2], m[1]) in items else "no"
    raise AssertionError(f"unexpected question {question!r}")


def questions_and_answers(sample) -> list[tuple[str, str]]:
    turns = sample.messages
    return [
        (user["content"].removeprefix(IMAGE_PLACEHOLDER + "\n"), assistant["content"])
        for user, assistant in zip(turns[::2], turns[1::2])
    ]


@pytest.fixture(scope="module")
def samples():
    return list(demo_samples(N, seed=0, image_size=64))


def test_every_answer_matches_what_is_drawn_in_the_image(samples):
    asked = set()
    for sample in samples:
        scene = perceive(sample.images[0])
        for question, answer in questions_and_answers(sample):
            kind, expected = expected_answer(question, scene)
            assert answer == expected, (sample.key, question)
            asked.add(kind)
    assert len(asked) == 6  # every kind of question occurs


def test_the_count_answer_equals_the_number_of_shapes_drawn(samples):
    counts = [
        (answer, len(perceive(s.images[0])))
        for s in samples
        for question, answer in questions_and_answers(s)
        if question == "how many shapes are there ?"
    ]
    assert counts and all(answer == str(n) for answer, n in counts)
    assert {answer for answer, _ in counts} == {"1", "2", "3", "4"}


def test_samples_are_well_formed_with_one_image_and_one_or_two_turns(samples):
    for sample in samples:
        sample.validate()
        assert len(sample.images) == 1 and sample.images[0].size == (64, 64)
        assert sample.messages[0]["content"].startswith(IMAGE_PLACEHOLDER + "\n")
        assert [m["role"] for m in sample.messages] in (["user", "assistant"], ["user", "assistant"] * 2)
    two_turns = sum(len(s.messages) == 4 for s in samples) / len(samples)
    assert 0.15 < two_turns < 0.45


def test_yes_no_answers_are_balanced(samples):
    answers = [a for s in samples for _, a in questions_and_answers(s) if a in ("yes", "no")]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_every_word_of_every_question_and_answer_is_in_the_vocabulary(samples):
    vocabulary = set(DEMO_VOCABULARY)
    for sample in samples:
        for question, answer in questions_and_answers(sample):
            assert set(question.split()) <= vocabulary, question
            assert set(re.findall(r"\w+|[^\w\s]+", question)) <= vocabulary  # tokenizers' Whitespace split
            assert answer in vocabulary
    assert IMAGE_PLACEHOLDER not in vocabulary
    assert len(DEMO_VOCABULARY) < 60


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds_and_splits():
    def fingerprint(**kw):
        return [(s.key, s.messages, s.images[0].tobytes()) for s in demo_samples(20, image_size=32, **kw)]

    assert fingerprint(seed=4) == fingerprint(seed=4)
    contents = lambda fp: [(m, px) for _, m, px in fp]  # noqa: E731
    assert contents(fingerprint(seed=4)) != contents(fingerprint(seed=5))
    assert contents(fingerprint(seed=4)) != contents(fingerprint(seed=4, split="val"))
    # Sample i does not depend on how many samples are drawn.
    assert fingerprint(seed=4)[:7] == [(s.key, s.messages, s.images[0].tobytes()) for s in demo_samples(7, 4, 32)]


def test_write_demo_shards_writes_train_and_val_shards_the_stream_reads_back(tmp_path):
    patterns = write_demo_shards(tmp_path, n_train=40, n_val=16, image_size=32, seed=1, samples_per_shard=None)
    assert patterns == {
        "train": f"{tmp_path}/train-{{000000..000007}}.tar",
        "val": f"{tmp_path}/val-{{000000..000007}}.tar",
    }
    train = list(sample_stream(patterns["train"], shuffle_buffer=0, seed=0, repeat=False))
    val = list(sample_stream(patterns["val"], shuffle_buffer=0, seed=0, repeat=False))
    assert len(train) == 40 and len(val) == 16
    assert [s.messages for s in train] == [s.messages for s in demo_samples(40, 1, 32)]
    assert {s.key for s in train}.isdisjoint(s.key for s in val)


def test_cli_demo_renders_both_splits_and_prints_the_patterns(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path),
                "--train",
                "30",
                "--val",
                "10",
                "--image-size",
                "32",
                "--seed",
                "2",
                "--samples-per-shard",
                "10",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"train: {tmp_path}/train-{{000000..000002}}.tar" in out
    assert f"val:   {tmp_path}/val-000000.tar" in out
    assert len(list(tmp_path.glob("*.tar"))) == 4
