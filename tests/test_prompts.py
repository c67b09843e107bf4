"""Prompts per family x task kind: snapshots, teacher/student alignment, answer span, BOS.

Snapshots live in tests/snapshots/<family>_<kind>.txt; regenerate with ``UPDATE_SNAPSHOTS=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny

from pipeline.prompts import Prompt, build_prompt, check_alignment, render_prompt
from pipeline.tasks.base import Example, TaskSpec

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("UPDATE_SNAPSHOTS") == "1"

SPECS = {
    "vqa": TaskSpec("vqa", "vqa", "vqa_accuracy", prompt="Question:{question} Short answer:"),
    "caption": TaskSpec("caption", "caption", "cider", prompt="Caption:", max_new_tokens=20),
    "text": TaskSpec("antonyms", "text", "exact_match", prompt="Input: {question} Output:"),
}
QUESTIONS = {
    "vqa": ["what colour is the circle?", "how many shapes are there?", "is the star yellow?"],
    "caption": ["", "", ""],
    "text": ["hot", "big", "up"],
}
ANSWERS = {
    "vqa": ["red", "2", "yes"],
    "caption": ["a red circle.", "two blue squares.", "a yellow star on white."],
    "text": ["cold", "small", "down"],
}
SIZES = [(56, 56), (84, 56), (56, 84)]
CASES = [(name, kind) for name in ("idefics", "idefics2", "idefics3", "smolvlm", "llava", "llava_next",
                                   "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl")
         for kind in SPECS]
CASES += [("llama", "text")]


def _examples(kind: str, synthetic_image) -> list[Example]:
    """Two demonstrations and a query (the last one)."""
    return [
        Example(f"{kind}-{i}", QUESTIONS[kind][i], (ANSWERS[kind][i],),
                None if kind == "text" else synthetic_image(i, SIZES[i]))
        for i in range(3)
    ]


def _pair(tf, kind: str, synthetic_image) -> tuple[Prompt, Prompt, Example]:
    *demos, query = _examples(kind, synthetic_image)
    spec, answer = SPECS[kind], ANSWERS[kind][2]
    answers = [d.answers[0] for d in demos]
    teacher = build_prompt(tf.family, tf.processor, spec, query, demos, answers, answer)
    student = build_prompt(tf.family, tf.processor, spec, query, [], [], answer)
    return teacher, student, query


def _check_snapshot(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"missing snapshot {path}; create it with UPDATE_SNAPSHOTS=1 and review it")
    assert text == path.read_text(encoding="utf-8"), f"prompt changed; see {path} (UPDATE_SNAPSHOTS=1 to accept)"


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_prompt_snapshot_alignment_and_answer(name, kind, synthetic_image):
    tf = tiny(name)
    teacher, student, query = _pair(tf, kind, synthetic_image)
    tok = tf.processor.tokenizer if hasattr(tf.processor, "tokenizer") else tf.processor
    text = (
        f"# {tf.family.name} / {kind}: teacher (2 demonstrations)\n{render_prompt(teacher, tf.processor)}\n"
        f"# student\n{render_prompt(student, tf.processor)}\n"
    )
    _check_snapshot(SNAPSHOTS / f"{name}_{kind}.txt", text)

    check_alignment(teacher, student, query.id)
    bos = tf.family.bos(tf.processor).input_ids[0]
    assert teacher.input_ids[0] == student.input_ids[0] == bos
    assert student.span_start == 1
    assert teacher.input_ids[teacher.span_start :] == student.input_ids[1:]
    expected_answer = SPECS[kind].answer.format(answer=ANSWERS[kind][2]) + tf.family.round_separator
    for prompt in (teacher, student):
        assert tok.decode(prompt.input_ids[prompt.answer_start :]) == expected_answer
    n_images = 0 if kind == "text" else 3
    assert len(teacher.encoded.images) == n_images and len(student.encoded.images) == min(n_images, 1)
    if n_images:  # the query image is the last one in both
        for key, value in teacher.encoded.images[-1].items():
            assert torch.equal(value, student.encoded.images[0][key])


def test_generation_prompt_has_no_answer(synthetic_image):
    tf = tiny("idefics2")
    *demos, query = _examples("vqa", synthetic_image)
    spec = SPECS["vqa"]
    gen = build_prompt(tf.family, tf.processor, spec, query, demos, ["red", "2"], None)
    forced = build_prompt(tf.family, tf.processor, spec, query, demos, ["red", "2"], "yes")
    assert gen.answer_start is None
    assert forced.input_ids[: len(gen.input_ids)] == gen.input_ids
    assert forced.answer_start == len(gen.input_ids)
    assert tf.processor.tokenizer.decode(gen.input_ids).endswith("Short answer:")


def test_boundary_merge_is_an_error():
    tf = tiny("llama")
    spec = TaskSpec("t", "text", "exact_match", prompt="Input: {question} Output: ", answer="{answer}")
    with pytest.raises(ValueError, match=r"query q7: .*not a prefix.*Output: "):
        build_prompt(tf.family, tf.processor, spec, Example("q7", "hot", ("cold",)), [], [], "cold")


def test_demo_answers_must_match_demos():
    tf = tiny("llama")
    demo = Example("d", "big", ("small",))
    with pytest.raises(ValueError, match="2 answers"):
        build_prompt(tf.family, tf.processor, SPECS["text"], Example("q", "hot", ("cold",)), [demo], ["a", "b"],
                     "cold")


def test_check_alignment_reports_the_first_difference():
    teacher = build_prompt(tiny("llama").family, tiny("llama").processor, SPECS["text"],
                           Example("q1", "hot", ("cold",)), [Example("d", "big", ("small",))], ["small"], "cold")
    other = Prompt(type(teacher.encoded)(teacher.input_ids[: teacher.span_start] + [7] * 3), teacher.span_start, None)
    with pytest.raises(ValueError, match="query q1: teacher and student query tokens differ at query offset 0"):
        check_alignment(teacher, other, "q1")
    shifted = Prompt(teacher.encoded, teacher.span_start, teacher.answer_start - 1)
    with pytest.raises(ValueError, match="answer starts"):
        check_alignment(teacher, shifted, "q1")


def test_image_paths_are_loaded(tmp_path, synthetic_image):
    tf = tiny("llava")
    path = tmp_path / "img.png"
    synthetic_image(3).save(path)
    spec = SPECS["vqa"]
    from_path = build_prompt(tf.family, tf.processor, spec, Example("p", "what?", ("x",), str(path)), [], [], "x")
    in_memory = build_prompt(tf.family, tf.processor, spec, Example("p", "what?", ("x",), synthetic_image(3)), [], [],
                             "x")
    assert from_path.input_ids == in_memory.input_ids
    assert torch.equal(from_path.encoded.images[0]["pixel_values"], in_memory.encoded.images[0]["pixel_values"])
