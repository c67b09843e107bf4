"""Rendered shapes: a multimodal VQA and captioning task the project makes itself (no downloads).

A scene is 1-4 shapes (circle, square, triangle), each a different colour (red, green, blue, yellow),
each in its own cell of a 3x3 grid with a little jitter, on a white square. ``make_scenes(n, seed)``
is deterministic and prefix-stable (the first k of n scenes are ``make_scenes(k, seed)``) and never
repeats a scene; ``render_scene`` draws without anti-aliasing, so the same scene gives the same
bytes. Images are rendered at access (kept in memory, never written).

Splits are disjoint by scene: eval = scenes[:eval_size], train = the next train_size, support =
the next support_size, so changing the pool size never changes the evaluation or training queries.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from pipeline.config import ConfigError
from pipeline.tasks.base import Example

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
BACKGROUND = (255, 255, 255)
GRID = 3
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
DEFAULT_IMAGE_SIZE = 96
MIN_IMAGE_SIZE = 48
SYNTHETIC_KEYS = ("image_size",)


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour name, grid cell (0-8, row-major), centre (x, y) and radius in pixels."""

    kind: str
    color: str
    cell: int
    x: int
    y: int
    radius: int


@dataclass(frozen=True)
class Scene:
    """Shapes in reading order of their cells, on a white ``size`` x ``size`` image."""

    shapes: tuple[Shape, ...]
    size: int = DEFAULT_IMAGE_SIZE


def _random_scene(rng: random.Random, size: int) -> Scene:
    cell_px = size // GRID
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(range(GRID * GRID), count))
    colors = rng.sample(list(COLORS), count)
    shapes = []
    for cell, color in zip(cells, colors, strict=True):
        kind = rng.choice(SHAPES)
        radius = rng.randint(cell_px * 9 // 32, cell_px * 12 // 32)
        slack = cell_px // 2 - radius - 1
        x = (cell % GRID) * cell_px + cell_px // 2 + rng.randint(-slack, slack)
        y = (cell // GRID) * cell_px + cell_px // 2 + rng.randint(-slack, slack)
        shapes.append(Shape(kind, color, cell, x, y, radius))
    return Scene(tuple(shapes), size)


def make_scenes(n: int, seed: int, size: int = DEFAULT_IMAGE_SIZE) -> list[Scene]:
    """``n`` distinct random scenes, deterministic in (seed, size) and prefix-stable in ``n``."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    rng = random.Random(f"shapes:{seed}")
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    for _ in range(100 * n + 100):
        if len(scenes) == n:
            break
        scene = _random_scene(rng, size)
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    if len(scenes) < n:
        raise ValueError(f"could not make {n} distinct scenes")
    return scenes


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image; the pixel at each shape's centre has exactly its colour."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill, r = COLORS[s.color], s.radius
        if s.kind == "circle":
            draw.ellipse((s.x - r, s.y - r, s.x + r, s.y + r), fill=fill)
        elif s.kind == "square":
            side = r * 8 // 10
            draw.rectangle((s.x - side, s.y - side, s.x + side, s.y + side), fill=fill)
        else:  # centroid at (x, y): apex r above, base r/2 below
            draw.polygon(
                [(s.x, s.y - r), (s.x - r * 87 // 100, s.y + r // 2), (s.x + r * 87 // 100, s.y + r // 2)],
                fill=fill,
            )
    return image


def _count_answers(count: int) -> tuple[str, ...]:
    # VQA-style light variation; the official normalisation maps number words to digits
    return (str(count),) * 7 + (NUMBER_WORDS[count],) * 3


def _questions_by_type(scene: Scene) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    kinds = [s.kind for s in scene.shapes]
    return {
        "count": [("How many shapes are there?", _count_answers(len(scene.shapes)))],
        "shape": [(f"What shape is {s.color}?", (s.kind,) * 10) for s in scene.shapes],
        # only shapes whose kind is unique in the scene, so the answer is unambiguous
        "color": [
            (f"What color is the {s.kind}?", (s.color,) * 10)
            for s in scene.shapes
            if kinds.count(s.kind) == 1
        ],
        "kind_count": [
            (f"How many {k}s are there?", _count_answers(kinds.count(k))) for k in SHAPES if k in kinds
        ],
    }


def scene_questions(scene: Scene) -> list[tuple[str, tuple[str, ...]]]:
    """Every unambiguous (question, ten answers) about the scene: counts, shapes by colour, colours."""
    return [q for qs in _questions_by_type(scene).values() for q in qs]


def scene_question(scene: Scene, seed: int, index: int) -> tuple[str, tuple[str, ...]]:
    """One question for a scene: a question type chosen uniformly, then one question of that type."""
    by_type = {t: qs for t, qs in _questions_by_type(scene).items() if qs}
    rng = random.Random(f"shapes_vqa:{seed}:{index}")
    return rng.choice(by_type[rng.choice(sorted(by_type))])


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_captions(scene: Scene) -> tuple[str, ...]:
    """Five reference captions; the first (reading order) is the one shown in demonstrations."""
    things = [f"a {s.color} {s.kind}" for s in scene.shapes]
    n = len(things)
    counted = "a single" + things[0][1:] if n == 1 else f"{NUMBER_WORDS[n]} shapes: {_join(things)}"
    return (
        _join(things),
        _join(things[::-1]),
        counted,
        _join([f"{t} at the {POSITIONS[s.cell]}" for t, s in zip(things, scene.shapes, strict=True)]),
        f"there {'is' if n == 1 else 'are'} {_join(things)}",
    )


class SceneExamples(Sequence):
    """A lazy sequence of ``Example`` over scenes; images are rendered at access."""

    def __init__(
        self,
        scenes: Sequence[Scene],
        offset: int,
        make: Callable[[Scene, int], Example],
        id_of: Callable[[int], str],
    ):
        self.scenes, self.offset, self.make, self.id_of = scenes, offset, make, id_of

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start = range(len(self))[index]
            return [self[i] for i in start]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index %= len(self)
        return self.make(self.scenes[index], self.offset + index)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def ids(self) -> list[str]:
        """Every example id in order, without rendering."""
        return [self.id_of(self.offset + i) for i in range(len(self))]


def synthetic_loaders(cfg: Any) -> dict[str, Callable[[], SceneExamples]]:
    """Split loaders of ``shapes_vqa`` (``kind: vqa``) or ``shapes_caption`` (``kind: caption``)."""
    unknown = sorted(set(cfg.synthetic) - set(SYNTHETIC_KEYS))
    if unknown:
        raise ConfigError(
            f"task {cfg.name}: unknown synthetic key(s) {unknown}; valid: {', '.join(SYNTHETIC_KEYS)}"
        )
    size = cfg.synthetic.get("image_size", DEFAULT_IMAGE_SIZE)
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"task {cfg.name}: 'synthetic.image_size': got {size!r}, expected an integer >= {MIN_IMAGE_SIZE}"
        )
    sizes = {"eval": cfg.eval_size or 200, "train": cfg.train_size, "support": cfg.support_size or 500}

    def id_of(index: int) -> str:
        return f"{cfg.name}-{index:06d}"

    def make(scene: Scene, index: int) -> Example:
        image = render_scene(scene)
        if cfg.kind == "caption":
            return Example(id_of(index), "", scene_captions(scene), image)
        question, answers = scene_question(scene, cfg.seed, index)
        return Example(id_of(index), question, answers, image)

    def loader(split: str) -> Callable[[], SceneExamples]:
        start = sum(
            sizes[s] for s in ("eval", "train", "support")[: ("eval", "train", "support").index(split)]
        )

        def load() -> SceneExamples:
            scenes = make_scenes(start + sizes[split], cfg.seed, size)[start:]
            return SceneExamples(scenes, start, make, id_of)

        return load

    return {split: loader(split) for split in ("support", "train", "eval")}
