"""The demo visual-question data set, rendered with PIL.

Each image shows one to four solid shapes (circle, square, triangle) in four colours, one per
quadrant of the image (top left, top right, bottom left, bottom right). Each sample asks one or
two questions with exact one-word answers, for example::

    <image>
    what colour is the circle ?          -> red
    how many shapes are there ?          -> 3
    what shape is in the top left ?      -> triangle   (or "nothing" for an empty quadrant)
    what colour is the shape in the bottom right ?  -> blue
    is there a blue square ?             -> yes | no   (balanced)
    how many red shapes are there ?      -> 0 .. 4

The vocabulary is small and closed (:data:`DEMO_VOCABULARY`); words are separated by single
spaces, "?" included, so ``text.split()`` and the ``tokenizers`` Whitespace pre-tokenizer both
yield vocabulary words only. Everything is deterministic from the seed: sample ``i`` of a split
is drawn from its own RNG seeded by ``(split, seed, i)``, so a longer run starts with the same
samples as a shorter one and train and validation never share an RNG stream.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm.data.records import IMAGE_PLACEHOLDER, Sample
from vlm.data.shards import shard_pattern, write_shards

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
}
# Quadrants, in the order of their cell index: index = 2 * row + column.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (24, 24, 24)
MAX_SHAPES = len(POSITIONS)
MIN_IMAGE_SIZE = 16

Q_COUNT = "how many shapes are there ?"
Q_COLOUR_OF_SHAPE = "what colour is the {shape} ?"
Q_SHAPE_AT = "what shape is in the {position} ?"
Q_COLOUR_AT = "what colour is the shape in the {position} ?"
Q_EXISTS = "is there a {colour} {shape} ?"
Q_COUNT_COLOUR = "how many {colour} shapes are there ?"
_TEMPLATES = (Q_COUNT, Q_COLOUR_OF_SHAPE, Q_SHAPE_AT, Q_COLOUR_AT, Q_EXISTS, Q_COUNT_COLOUR)
NOTHING = "nothing"

# Probability that a sample has a second question/answer turn.
SECOND_TURN_PROBABILITY = 0.3
# The demo CLI splits each split into this many shards by default, so up to 8 ranks x workers
# (or any divisor) each get shards.
DEFAULT_SHARDS_PER_SPLIT = 8


def demo_vocabulary() -> list[str]:
    """Every word that can appear in a demo question or answer (not the image placeholder), sorted."""
    words: set[str] = set()
    for template in _TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update(SHAPES)
    words.update(COLOURS)
    for position in POSITIONS:
        words.update(position.split())
    words.update({"yes", "no", NOTHING})
    words.update(str(n) for n in range(MAX_SHAPES + 1))
    return sorted(words)


DEMO_VOCABULARY: list[str] = demo_vocabulary()


@dataclass(frozen=True)
class DemoShape:
    """One shape of a scene: its kind, colour name and quadrant index (see :data:`POSITIONS`)."""

    shape: str
    colour: str
    cell: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class DemoScene:
    """What an image shows: at most one shape per quadrant."""

    shapes: tuple[DemoShape, ...]

    def at(self, cell: int) -> DemoShape | None:
        return next((s for s in self.shapes if s.cell == cell), None)


def random_scene(rng: random.Random) -> DemoScene:
    """One to four shapes of random kind and colour in distinct quadrants."""
    n = rng.randint(1, MAX_SHAPES)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    colours = list(COLOURS)
    return DemoScene(tuple(DemoShape(rng.choice(SHAPES), rng.choice(colours), cell) for cell in cells))


def render_scene(scene: DemoScene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene as an RGB ``image_size`` x ``image_size`` image.

    Shapes are drawn without anti-aliasing, in their exact colours, strictly inside their quadrant
    (a one-pixel margin), with a random size of 55-85% of the quadrant and a random offset: that
    keeps every question answerable from the pixels while not letting a model memorise positions.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = image_size // 2
    for item in scene.shapes:
        row, column = divmod(item.cell, 2)
        cell_x, cell_y = column * half, row * half
        extent = max(4, int(half * rng.uniform(0.55, 0.85)))
        slack = half - 2 - extent  # free room inside the one-pixel margins
        x0 = cell_x + 1 + rng.randint(0, max(0, slack))
        y0 = cell_y + 1 + rng.randint(0, max(0, slack))
        box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + (extent - 1) / 2, y0), (box[2], box[3]), (x0, box[3])], fill=fill)
    return image


def _ask_count(scene: DemoScene, rng: random.Random) -> tuple[str, str]:
    return Q_COUNT, str(len(scene.shapes))


def _ask_colour_of_shape(scene: DemoScene, rng: random.Random) -> tuple[str, str] | None:
    # Only ask about a kind that appears exactly once, so the answer is unambiguous.
    unique = [s for s in scene.shapes if sum(o.shape == s.shape for o in scene.shapes) == 1]
    if not unique:
        return None
    item = rng.choice(unique)
    return Q_COLOUR_OF_SHAPE.format(shape=item.shape), item.colour


def _ask_shape_at(scene: DemoScene, rng: random.Random) -> tuple[str, str]:
    empty = [c for c in range(len(POSITIONS)) if scene.at(c) is None]
    if empty and rng.random() < 0.25:
        return Q_SHAPE_AT.format(position=POSITIONS[rng.choice(empty)]), NOTHING
    item = rng.choice(scene.shapes)
    return Q_SHAPE_AT.format(position=item.position), item.shape


def _ask_colour_at(scene: DemoScene, rng: random.Random) -> tuple[str, str]:
    item = rng.choice(scene.shapes)
    return Q_COLOUR_AT.format(position=item.position), item.colour


def _ask_exists(scene: DemoScene, rng: random.Random) -> tuple[str, str]:
    present = sorted({(s.colour, s.shape) for s in scene.shapes})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    # Half yes, half no: a model cannot score by always answering the same.
    if rng.random() < 0.5:
        (colour, shape), answer = rng.choice(present), "yes"
    else:
        (colour, shape), answer = rng.choice(absent), "no"
    return Q_EXISTS.format(colour=colour, shape=shape), answer


def _ask_count_colour(scene: DemoScene, rng: random.Random) -> tuple[str, str]:
    # Mostly ask about a colour that is present, so "0" does not dominate the answers.
    if rng.random() < 0.75:
        colour = rng.choice(scene.shapes).colour
    else:
        colour = rng.choice(list(COLOURS))
    return Q_COUNT_COLOUR.format(colour=colour), str(sum(s.colour == colour for s in scene.shapes))


_QUESTIONS = (_ask_count, _ask_colour_of_shape, _ask_shape_at, _ask_colour_at, _ask_exists, _ask_count_colour)


def ask_questions(scene: DemoScene, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` distinct (question, answer) pairs about the scene, of distinct kinds."""
    kinds = list(_QUESTIONS)
    rng.shuffle(kinds)
    pairs: list[tuple[str, str]] = []
    for ask in kinds:
        pair = ask(scene, rng)
        if pair is not None:
            pairs.append(pair)
        if len(pairs) == n:
            break
    return pairs


def demo_sample(index: int, seed: int, image_size: int, split: str = "train") -> Sample:
    """Sample ``index`` of the demo split ``split`` for ``seed`` (independent of every other index)."""
    rng = random.Random(f"vlm-demo/{split}/{seed}/{index}")
    scene = random_scene(rng)
    image = render_scene(scene, image_size, rng)
    turns = 2 if rng.random() < SECOND_TURN_PROBABILITY else 1
    messages: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(ask_questions(scene, rng, turns)):
        prefix = IMAGE_PLACEHOLDER + "\n" if i == 0 else ""
        messages.append({"role": "user", "content": prefix + question})
        messages.append({"role": "assistant", "content": answer})
    return Sample(key=f"{split}-s{seed}-{index:07d}", images=[image], messages=messages)


def demo_samples(n: int, seed: int, image_size: int, *, split: str = "train") -> Iterator[Sample]:
    """``n`` demo samples, deterministic from ``(split, seed)``; each has one image."""
    for index in range(n):
        yield demo_sample(index, seed, image_size, split)


def write_demo_shards(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    image_size: int,
    seed: int,
    samples_per_shard: int | None = None,
) -> dict[str, str]:
    """Render the demo set into ``out_dir/train-*.tar`` and ``out_dir/val-*.tar``.

    Args:
        samples_per_shard: shard size; ``None`` splits each split into
            :data:`DEFAULT_SHARDS_PER_SPLIT` shards (fewer if it has fewer samples).

    Returns:
        ``{"train": pattern, "val": pattern}``, brace patterns of absolute shard paths.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least one train and one val sample, got {n_train} and {n_val}")
    out_dir = Path(out_dir).absolute()
    patterns = {}
    for split, n in (("train", n_train), ("val", n_val)):
        per_shard = samples_per_shard or math.ceil(n / DEFAULT_SHARDS_PER_SPLIT)
        paths = write_shards(demo_samples(n, seed, image_size, split=split), out_dir, split, per_shard, "png")
        patterns[split] = shard_pattern(paths)
    return patterns
