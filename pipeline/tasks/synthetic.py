"""Rendered shapes: a multimodal VQA and captioning task the project makes itself (no downloads).

A scene is 1-4 shapes (circle, square, triangle), each in its own cell of a 3x3 grid with a little
jitter, on a white square. Two styles: ``mixed`` (``shapes_vqa``/``shapes_caption``), every shape its
own kind and a different colour (red, green, blue, yellow), and questions that bind attributes
("What shape is red?"); ``group`` (``shapes_group_vqa``/``shapes_group_caption``), 1-4 copies of one
coloured shape ("three red circles"), and questions about its count, colour and kind that need no
binding (a 135M language model given the scene as text answers them at 8 shots, see
``pipeline.demo_vlm``). ``make_scenes(n, seed)``
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
SYNTHETIC_KEYS = ("image_size", "style")
STYLES = ("mixed", "group")
"""mixed: distinct colours, kinds drawn per shape; group: one colour and one kind for every shape."""


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


def _random_scene(rng: random.Random, size: int, style: str = "mixed") -> Scene:
    cell_px = size // GRID
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(range(GRID * GRID), count))
    if style == "group":
        colors, kinds = [rng.choice(list(COLORS))] * count, [rng.choice(SHAPES)] * count
    else:
        colors, kinds = rng.sample(list(COLORS), count), [None] * count
    shapes = []
    for cell, color, kind in zip(cells, colors, kinds, strict=True):
        kind = kind or rng.choice(SHAPES)
        radius = rng.randint(cell_px * 9 // 32, cell_px * 12 // 32)
        slack = cell_px // 2 - radius - 1
        x = (cell % GRID) * cell_px + cell_px // 2 + rng.randint(-slack, slack)
        y = (cell // GRID) * cell_px + cell_px // 2 + rng.randint(-slack, slack)
        shapes.append(Shape(kind, color, cell, x, y, radius))
    return Scene(tuple(shapes), size)


def make_scenes(n: int, seed: int, size: int = DEFAULT_IMAGE_SIZE, style: str = "mixed") -> list[Scene]:
    """``n`` distinct random scenes, deterministic in (seed, size, style) and prefix-stable in ``n``."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; choose one of {', '.join(STYLES)}")
    rng = random.Random(f"shapes:{seed}" if style == "mixed" else f"shapes-{style}:{seed}")
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    for _ in range(100 * n + 100):
        if len(scenes) == n:
            break
        scene = _random_scene(rng, size, style)
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


def is_group(scene: Scene) -> bool:
    """Every shape has the same colour and kind (one shape counts as a group)."""
    return len({(s.color, s.kind) for s in scene.shapes}) == 1


def _group_questions(scene: Scene) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    n, first = len(scene.shapes), scene.shapes[0]
    kind_answers = (first.kind,) * 10 if n == 1 else (first.kind,) * 7 + (first.kind + "s",) * 3
    return {
        "count": [("How many shapes are there?", _count_answers(n))],
        "color": [("What color is the shape?" if n == 1 else "What color are the shapes?", (first.color,) * 10)],
        "shape": [("What shape is it?" if n == 1 else "What shape are they?", kind_answers)],
    }


def _questions_by_type(scene: Scene, style: str = "mixed") -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    if style == "group":
        if not is_group(scene):
            raise ValueError("group questions need a scene of one colour and one kind")
        return _group_questions(scene)
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


def scene_questions(scene: Scene, style: str = "mixed") -> list[tuple[str, tuple[str, ...]]]:
    """Every unambiguous (question, ten answers) about the scene. mixed: counts, shapes by colour,
    colours by shape, counts by kind; group: the count, the colour and the kind of the group."""
    return [q for qs in _questions_by_type(scene, style).values() for q in qs]


def scene_question(scene: Scene, seed: int, index: int, style: str = "mixed") -> tuple[str, tuple[str, ...]]:
    """One question for a scene: a question type chosen uniformly, then one question of that type."""
    by_type = {t: qs for t, qs in _questions_by_type(scene, style).items() if qs}
    rng = random.Random(f"shapes_vqa:{seed}:{index}")
    return rng.choice(by_type[rng.choice(sorted(by_type))])


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_captions(scene: Scene, style: str = "mixed") -> tuple[str, ...]:
    """Five reference captions; the first is the one shown in demonstrations (mixed: reading order;
    group: "three red circles")."""
    if style == "group":
        if not is_group(scene):
            raise ValueError("group captions need a scene of one colour and one kind")
        n, s = len(scene.shapes), scene.shapes[0]
        where = _join([POSITIONS[t.cell] for t in scene.shapes])
        if n == 1:
            return (f"a {s.color} {s.kind}", f"one {s.color} {s.kind}", f"a single {s.color} {s.kind}",
                    f"a {s.color} {s.kind} at the {where}", f"there is a {s.color} {s.kind}")
        word, plural = NUMBER_WORDS[n], f"{s.color} {s.kind}s"
        return (f"{word} {plural}", f"{n} {plural}", f"{word} {s.kind}s, all {s.color}",
                f"{word} {plural} at the {where}", f"there are {word} {plural}")
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
    """Split loaders of ``shapes_vqa`` (``kind: vqa``) or ``shapes_caption`` (``kind: caption``), and
    their ``group`` style versions (``synthetic: {style: group}``)."""
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
    style = cfg.synthetic.get("style", "mixed")
    if style not in STYLES:
        raise ConfigError(f"task {cfg.name}: 'synthetic.style': got {style!r}, expected one of {', '.join(STYLES)}")
    sizes = {"eval": cfg.eval_size or 200, "train": cfg.train_size, "support": cfg.support_size or 500}

    def id_of(index: int) -> str:
        return f"{cfg.name}-{index:06d}"

    def make(scene: Scene, index: int) -> Example:
        image = render_scene(scene)
        if cfg.kind == "caption":
            return Example(id_of(index), "", scene_captions(scene, style), image)
        question, answers = scene_question(scene, cfg.seed, index, style)
        return Example(id_of(index), question, answers, image)

    def loader(split: str) -> Callable[[], SceneExamples]:
        start = sum(
            sizes[s] for s in ("eval", "train", "support")[: ("eval", "train", "support").index(split)]
        )

        def load() -> SceneExamples:
            scenes = make_scenes(start + sizes[split], cfg.seed, size, style)[start:]
            return SceneExamples(scenes, start, make, id_of)

        return load

    return {split: loader(split) for split in ("support", "train", "eval")}
