"""Rendered shapes tasks: determinism, and answers checked against the pixels by an independent reader."""

from __future__ import annotations

import io

import pytest

from pipeline.config import ConfigError
from pipeline.tasks import load_task, most_frequent_answer
from pipeline.tasks.synthetic import Scene, Shape, make_scenes, render_scene, scene_captions, scene_questions

WORDS = {"one": "1", "two": "2", "three": "3", "four": "4"}


def colour_name(rgb: tuple[int, int, int]) -> str | None:
    """Colour of a pixel by coarse thresholds (independent of the module's palette)."""
    r, g, b = rgb
    if r > 200 and g > 200 and b > 200:
        return None  # background
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > 120 and r < 100 and b < 120:
        return "green"
    if b > 150 and r < 100 and g < 150:
        return "blue"
    raise AssertionError(f"unexpected pixel colour {rgb}")


def read_shapes(image) -> list[tuple[str, str]]:
    """(colour, shape) of each blob: connected same-colour pixels; shape from its bounding-box fill."""
    w, h = image.size
    px = image.load()
    seen, blobs = set(), []
    for y0 in range(h):
        for x0 in range(w):
            colour = colour_name(px[x0, y0])
            if colour is None or (x0, y0) in seen:
                continue
            stack, cells = [(x0, y0)], []
            seen.add((x0, y0))
            while stack:
                x, y = stack.pop()
                cells.append((x, y))
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if (
                        0 <= nx < w
                        and 0 <= ny < h
                        and (nx, ny) not in seen
                        and colour_name(px[nx, ny]) == colour
                    ):
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            xs, ys = [c[0] for c in cells], [c[1] for c in cells]
            fill = len(cells) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
            assert fill > 0.4, f"blob fill {fill:.2f} fits no shape"
            blobs.append((colour, shape))
    return blobs


def expected_answer(question: str, blobs: list[tuple[str, str]]) -> str:
    words = question.rstrip("?").split()
    if question in ("What color is the shape?", "What color are the shapes?"):
        (colour,) = {c for c, _ in blobs}
        return colour
    if question in ("What shape is it?", "What shape are they?"):
        (shape,) = {s for _, s in blobs}
        return shape
    if question == "How many shapes are there?":
        return str(len(blobs))
    if question.startswith("How many"):
        return str(sum(shape + "s" == words[2] for _, shape in blobs))
    if question.startswith("What shape is"):
        return next(shape for colour, shape in blobs if colour == words[-1])
    if question.startswith("What color is the"):
        (colour,) = [c for c, shape in blobs if shape == words[-1]]
        return colour
    raise AssertionError(f"unknown question {question}")


def test_make_scenes_deterministic_prefix_stable_distinct():
    scenes = make_scenes(300, seed=5)
    assert scenes == make_scenes(300, seed=5)
    assert scenes[:40] == make_scenes(40, seed=5)
    assert len(set(scenes)) == 300
    assert scenes != make_scenes(300, seed=6)
    assert all(1 <= len(s.shapes) <= 4 for s in scenes)


def test_render_is_byte_identical():
    for scene in make_scenes(5, seed=1):
        a, b = render_scene(scene), render_scene(scene)
        assert a.mode == "RGB" and a.size == (96, 96)
        assert a.tobytes() == b.tobytes()
        png_a, png_b = io.BytesIO(), io.BytesIO()
        a.save(png_a, "PNG")
        b.save(png_b, "PNG")
        assert png_a.getvalue() == png_b.getvalue()


def test_centre_pixel_has_the_shape_colour():
    for scene in make_scenes(40, seed=2):
        image = render_scene(scene)
        for shape in scene.shapes:
            assert colour_name(image.getpixel((shape.x, shape.y))) == shape.color
        assert colour_name(image.getpixel((0, 0))) is None


def test_every_answer_matches_the_pixels():
    for scene in make_scenes(25, seed=3):
        blobs = read_shapes(render_scene(scene))
        assert sorted(blobs) == sorted((s.color, s.kind) for s in scene.shapes)
        for question, answers in scene_questions(scene):
            assert len(answers) == 10
            assert {WORDS.get(a, a) for a in answers} == {expected_answer(question, blobs)}, question


def test_group_scenes_answers_match_the_pixels():
    scenes = make_scenes(60, seed=4, style="group")
    assert scenes[:10] == make_scenes(10, seed=4, style="group") and len(set(scenes)) == 60
    assert {len(s.shapes) for s in scenes} == {1, 2, 3, 4}
    combos = {(s.shapes[0].color, s.shapes[0].kind) for s in make_scenes(300, seed=4, style="group")}
    assert len(combos) == 12  # every colour x kind
    for scene in scenes:
        blobs = read_shapes(render_scene(scene))
        assert len(set(blobs)) == 1 and len(blobs) == len(scene.shapes)
        questions = scene_questions(scene, "group")
        assert len(questions) == 3
        for question, answers in questions:
            assert len(answers) == 10
            # plurals ("circles") are accepted as 3 of the 10 human answers, as VQAv2 annotators vary
            singular = {WORDS.get(a, a).removesuffix("s") if not a.isdigit() else a for a in answers}
            assert singular == {expected_answer(question, blobs)}, question


def test_group_captions_and_refusals():
    scene = Scene(tuple(Shape("circle", "red", c, 16 + 32 * (c % 3), 16, 10) for c in (0, 1, 2)))
    assert scene_captions(scene, "group")[:3] == ("three red circles", "3 red circles", "three circles, all red")
    assert "three red circles at the top left, top and top right" in scene_captions(scene, "group")
    one = Scene((Shape("square", "blue", 4, 48, 48, 10),))
    assert scene_captions(one, "group")[0] == "a blue square"
    assert scene_questions(one, "group")[1] == ("What color is the shape?", ("blue",) * 10)
    mixed = Scene((Shape("circle", "red", 0, 16, 16, 10), Shape("square", "blue", 4, 48, 48, 10)))
    with pytest.raises(ValueError, match="one colour and one kind"):
        scene_questions(mixed, "group")
    with pytest.raises(ValueError, match="style"):
        make_scenes(3, 0, style="striped")
    with pytest.raises(ConfigError, match="style"):
        load_task("shapes_vqa", synthetic={"style": "striped"}).split("eval")
    task = load_task("shapes_group_vqa", support_size=5, train_size=5, eval_size=20)
    assert {q.question for q in task.split("eval")} >= {"How many shapes are there?"}
    # the mixed style's scenes are unchanged by the group style's existence
    assert make_scenes(5, 3407) == load_task("shapes_vqa", eval_size=5).split("eval").scenes


def test_captions_name_every_shape():
    scene = Scene((Shape("circle", "red", 0, 16, 16, 10), Shape("square", "blue", 4, 48, 48, 10)))
    captions = scene_captions(scene)
    assert captions[0] == "a red circle and a blue square"
    assert "a blue square and a red circle" in captions
    assert "a red circle at the top left and a blue square at the center" in captions
    assert most_frequent_answer(captions) == captions[0]


def test_tasks_splits_disjoint_and_stable():
    task = load_task("shapes_vqa", support_size=30, train_size=20, eval_size=10)
    ids = {s: task.split(s).ids() for s in ("support", "train", "eval")}
    assert [len(ids[s]) for s in ("support", "train", "eval")] == [30, 20, 10]
    assert not (set(ids["support"]) & set(ids["train"]) or set(ids["support"]) & set(ids["eval"]))
    assert not set(ids["train"]) & set(ids["eval"])
    assert [e.id for e in task.split("eval")] == ids["eval"]
    bigger = load_task("shapes_vqa", support_size=60, train_size=20, eval_size=10)
    assert [(e.question, e.answers) for e in bigger.split("eval")] == [
        (e.question, e.answers) for e in task.split("eval")
    ]
    assert render_scene_bytes(bigger.split("train")[3]) == render_scene_bytes(task.split("train")[3])
    example = task.split("train")[0]
    assert example.image.size == (96, 96) and len(example.answers) == 10
    assert task.spec.metric == "vqa_accuracy" and task.spec.kind == "vqa"


def render_scene_bytes(example) -> bytes:
    return example.image.tobytes()


def test_caption_task_and_bad_options():
    task = load_task(
        "shapes_caption", support_size=5, train_size=5, eval_size=5, synthetic={"image_size": 64}
    )
    example = task.split("eval")[0]
    assert example.question == "" and len(example.answers) == 5 and example.image.size == (64, 64)
    assert task.spec.kind == "caption" and task.spec.metric == "cider" and task.spec.max_new_tokens == 20
    with pytest.raises(ConfigError, match="source"):
        load_task("shapes_vqa", source="hub")
    with pytest.raises(ConfigError, match="image_size"):
        load_task("shapes_vqa", synthetic={"image_size": 10}).split("eval")
