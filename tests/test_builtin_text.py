"""Built-in text tasks (YAML files with ``loader: words``): data files, disjoint stable splits, registry."""

from __future__ import annotations

import importlib.util
import json

import pytest

from pipeline.config import UserError
from pipeline.tasks import TASKS_DIR, load_task, task_names
from pipeline.tasks.base import SPLITS, Example, Task
from pipeline.tasks.builtin_text import TEXT_TASK_NAMES, read_text_task_file, split_examples

TEXT_TASKS_DIR = TASKS_DIR / "words"


def load_text_task_splits(name):
    task = load_task(name)
    return {split: task.split(split) for split in SPLITS}


def _build_module():
    spec = importlib.util.spec_from_file_location("text_tasks_build", TEXT_TASKS_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", TEXT_TASK_NAMES)
def test_data_file_is_clean(name):
    examples = read_text_task_file(TEXT_TASKS_DIR / f"{name}.jsonl")
    assert len(examples) >= 200
    assert len({e.id for e in examples}) == len(examples)
    assert len({e.question.lower() for e in examples}) == len(examples)
    assert all(e.id.startswith(f"{name}-") for e in examples)
    assert all(len(e.answers) == 1 and e.answers[0].strip() and e.question.strip() for e in examples)
    assert all("\n" not in e.question + e.answers[0] and "->" not in e.question for e in examples)


@pytest.mark.parametrize("name", TEXT_TASK_NAMES)
def test_splits_are_disjoint_and_cover_the_file(name):
    splits = load_text_task_splits(name)
    assert set(splits) == set(SPLITS)
    ids = [set(e.id for e in splits[s]) for s in SPLITS]
    inputs = [set(e.question.lower() for e in splits[s]) for s in SPLITS]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not ids[a] & ids[b] and not inputs[a] & inputs[b]
    total = len(read_text_task_file(TEXT_TASKS_DIR / f"{name}.jsonl"))
    assert sum(len(x) for x in ids) == total
    # demonstrations need a small pool (8 shots + the excluded query); training queries are the bottleneck
    assert len(splits["eval"]) >= 50 and len(splits["train"]) >= 100 and len(splits["support"]) >= 40


def test_splits_do_not_depend_on_line_order():
    examples = read_text_task_file(TEXT_TASKS_DIR / "antonyms.jsonl")
    forward = split_examples(examples)
    backward = split_examples(tuple(reversed(examples)))
    for name in SPLITS:
        assert {e.id for e in forward[name]} == {e.id for e in backward[name]}


def test_data_files_match_their_generator():
    built = _build_module().build()
    assert sorted(built) == sorted(TEXT_TASK_NAMES)
    for name, rows in built.items():
        lines = (TEXT_TASKS_DIR / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows


def test_number_words_spelling():
    words = _build_module().number_in_words
    assert [words(n) for n in (0, 13, 40, 42, 100, 305, 999)] == [
        "zero", "thirteen", "forty", "forty-two", "one hundred", "three hundred five",
        "nine hundred ninety-nine"]


def test_registry_builds_tasks_with_the_text_spec():
    assert set(TEXT_TASK_NAMES) <= set(task_names())
    for name in TEXT_TASK_NAMES:  # each is a YAML file including the shared template
        assert (TASKS_DIR / f"{name}.yaml").is_file()
    task = load_task("antonyms")
    assert isinstance(task, Task)
    spec = task.spec
    assert (spec.kind, spec.metric, spec.prompt, spec.answer, spec.max_new_tokens) == (
        "text", "exact_match", "{question} ->", " {answer}", 10)
    hot = next(e for s in SPLITS for e in task.split(s) if e.question == "hot")
    assert isinstance(hot, Example) and hot.answers == ("cold",) and hot.image is None
    assert task.demo_answer(hot) == "cold"


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "input": "hot", "answer": "cold"}\n{"id": "b", "input": "big", "answer": " "}\n')
    with pytest.raises(UserError, match=r"broken.jsonl:2: .*answer"):
        read_text_task_file(path)
    path.write_text('{"id": "a", "input": "hot", "answer": "cold"}\n{"id": "a", "input": "big", "answer": "small"}\n')
    with pytest.raises(UserError, match="duplicate id 'a'"):
        read_text_task_file(path)


def test_unknown_task_lists_valid_names():
    with pytest.raises(UserError, match="antonyms"):
        load_text_task_splits("synonyms")


def test_size_options_take_seeded_subsets_of_the_hash_splits():
    whole = load_text_task_splits("plurals")
    task = load_task("plurals", train_size=10, eval_size=7)
    train, evaluation = task.split("train"), task.split("eval")
    assert len(train) == 10 and len(evaluation) == 7 and len(task.split("support")) == len(whole["support"])
    assert {e.id for e in train} <= {e.id for e in whole["train"]}
    assert [e.id for e in train] == [e.id for e in load_task("plurals", train_size=10).split("train")]
    with pytest.raises(UserError, match="train_size asks for 1000"):
        load_task("plurals", train_size=1000).split("train")
