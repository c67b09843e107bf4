"""Faults of user task files: each is one ``UserError`` line naming the file (and the line, and the
field where there is one), never a traceback and never a silently wrong example."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from pipeline.config import ConfigError, UserError  # noqa: E402
from pipeline.tasks import load_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def task_dir(tmp_path, data: str | bytes, name: str = "rows.jsonl", yaml: str | None = None) -> Path:
    """A task YAML (``task.yaml``) whose support split is the data file ``name``."""
    file = tmp_path / name
    if isinstance(data, bytes):
        file.write_bytes(data)
    else:
        file.write_text(data)
    (tmp_path / "task.yaml").write_text(yaml if yaml is not None else f"files: {{support: {name}}}\n")
    return tmp_path / "task.yaml"


def user_error(yaml_path, **options) -> str:
    with pytest.raises(UserError) as err:
        load_task(str(yaml_path), **options)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- the task YAML ------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nfiles: {support: a.jsonl\nprompt: 'Q:{question}'\n")
    message = user_error(path)
    assert str(path) in message and "line 3" in message and "invalid YAML" in message


def test_yaml_bad_indentation_names_file_and_line(tmp_path):
    path = tmp_path / "indent.yaml"
    path.write_text("files:\n  support: a.jsonl\n eval: b.jsonl\n")
    message = user_error(path)
    assert str(path) in message and "line 3" in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    message = user_error(path)
    assert str(path) in message and "list" in message and "mapping" in message


def test_file_path_that_is_not_a_string_is_a_config_error(tmp_path):
    path = task_dir(tmp_path, jsonl({"question": "q", "answer": "a"}), yaml="files: {support: 3}\n")
    with pytest.raises(ConfigError, match=r"'files': support: got 3, expected a file path"):
        load_task(str(path))


# --- unreadable data files ----------------------------------------------------------------------


def test_broken_jsonl_line_names_file_and_line(tmp_path, hf_cache):
    rows = jsonl({"question": "a?", "answer": "x"}, "", {"question": "b?", "answer": "y"}, '{"question": "c?", "answer": ')
    path = task_dir(tmp_path, rows)
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.jsonl") in message and "line 4" in message and "invalid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path, hf_cache):
    path = task_dir(tmp_path, jsonl({"question": "a?", "answer": "x"}, "[1, 2]"))
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.jsonl") in message and "line 2" in message and "JSON array" in message


def test_json_array_with_a_bad_record(tmp_path, hf_cache):
    path = task_dir(tmp_path, json.dumps([{"question": "a?", "answer": "x"}, 7]), name="rows.json")
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.json") in message and "record 2" in message


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_jsonl_says_no_rows(tmp_path, hf_cache, content):
    path = task_dir(tmp_path, content)
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.jsonl") in message and "has no rows" in message


def test_non_utf8_jsonl_names_the_line(tmp_path, hf_cache):
    data = (jsonl({"question": "a?", "answer": "x"}) + '{"question": "caf\xe9?", "answer": "y"}\n').encode("latin-1")
    path = task_dir(tmp_path, data)
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.jsonl") in message and "line 2" in message and "UTF-8" in message


def test_unreadable_csv_names_the_file(tmp_path, hf_cache):
    path = task_dir(tmp_path, 'question,answer\n"unterminated,x\nb,y\n', name="rows.csv")
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.csv") in message and "could not read" in message


@pytest.mark.parametrize("content", ["", "question,answer\n"])
def test_csv_without_rows(tmp_path, hf_cache, content):
    path = task_dir(tmp_path, content, name="rows.csv")
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.csv") in message and "has no rows" in message


def test_csv_with_a_column_named_twice(tmp_path, hf_cache):
    path = task_dir(tmp_path, "question,answer,answer\nq,a,b\n", name="rows.csv")
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.csv") in message and "'answer' named twice" in message


def test_unreadable_parquet_names_the_file(tmp_path, hf_cache):
    path = task_dir(tmp_path, b"PAR1 this is not a parquet file", name="rows.parquet")
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.parquet") in message and "could not read" in message


# --- values that are not text -------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, line, field, what",
    [
        ([{"question": {"a": 1}, "answer": "x"}, {"question": {"a": 2}, "answer": "y"}], 1, "question", "JSON object"),
        ([{"question": "ok?", "answer": "x"}, {"question": {"a": 2}, "answer": "y"}], 2, "question", "JSON object"),
        ([{"question": "ok?", "answer": "x"}, {"question": [1, 2], "answer": "y"}], 2, "question", "JSON array"),
        ([{"question": True, "answer": "x"}], 1, "question", "JSON boolean"),
        ([{"question": "q?", "answer": "x"}, {"question": "r?", "answer": {"text": "y"}}], 2, "answer", "JSON object"),
        ([{"question": "q?", "answers": ["x", "y"]}, {"question": "r?", "answers": [{"a": 1}]}], 2, "answers",
         "list holding a JSON object"),
        ([{"question": "q?", "answers": [["x"]]}], 1, "answers", "list holding a JSON array"),
        ([{"question": "q?", "answers": ["x", None]}], 1, "answers", "list holding null"),
    ],
)
def test_object_or_list_where_text_is_expected_is_refused(tmp_path, hf_cache, rows, line, field, what):
    path = task_dir(tmp_path, jsonl(*rows))
    message = user_error(path, cache_dir=hf_cache)
    assert str(tmp_path / "rows.jsonl") in message and f"line {line}:" in message
    assert f"field '{field}'" in message and what in message


def test_ids_mixing_numbers_and_text_are_refused(tmp_path, hf_cache):
    path = task_dir(tmp_path, jsonl({"id": "a", "question": "q", "answer": "x"}, {"id": 2, "question": "r", "answer": "y"}))
    message = user_error(path, cache_dir=hf_cache)
    assert "line 2" in message and "field 'id'" in message


def test_empty_string_in_a_mixed_column_is_missing(tmp_path, hf_cache):
    path = task_dir(tmp_path, jsonl({"question": "q", "answer": 4}, {"question": "r", "answer": ""}))
    message = user_error(path, cache_dir=hf_cache)
    assert "line 2" in message and "field 'answer' is missing or empty" in message


def test_numbers_are_read_as_the_text_they_spell(tmp_path, hf_cache):
    rows = [
        {"question": "2+2?", "answer": 4},
        {"question": 7, "answer": "seven"},
        {"question": "half of 5?", "answer": 2.5},
        {"question": "list?", "answers": [1, "one", 1.0]},
    ]
    path = task_dir(tmp_path, jsonl(*rows[:3]))
    examples = list(load_task(str(path), cache_dir=hf_cache).split("support"))
    assert [(e.question, e.answers) for e in examples] == [("2+2?", ("4",)), ("7", ("seven",)), ("half of 5?", ("2.5",))]
    (tmp_path / "list.jsonl").write_text(jsonl(rows[3]))
    (tmp_path / "list.yaml").write_text("files: {support: list.jsonl}\n")
    assert load_task(str(tmp_path / "list.yaml"), cache_dir=hf_cache).split("support")[0].answers == ("1", "one", "1")


def test_csv_cells_keep_their_spelling(tmp_path, hf_cache):
    path = task_dir(tmp_path, "id,question,answers\n001,007?,1.50|2\n002,x,y\n", name="rows.csv")
    first = load_task(str(path), cache_dir=hf_cache).split("support")[0]
    assert (first.id, first.question, first.answers) == ("001", "007?", ("1.50", "2"))


# --- splits -------------------------------------------------------------------------------------


def rows(n: int) -> str:
    return jsonl(*({"question": f"q{i}", "answer": f"a{i}"} for i in range(n)))


def test_train_size_larger_than_the_split_names_the_sizes(tmp_path, hf_cache):
    (tmp_path / "eval.jsonl").write_text(rows(2))
    path = task_dir(tmp_path, rows(3), yaml="files: {support: rows.jsonl, eval: eval.jsonl}\ntrain_size: 5\n")
    message = user_error(path, cache_dir=hf_cache)
    assert "train_size is 5" in message and "support 3, train 0, eval 2" in message


def test_split_ratio_that_leaves_a_split_empty_names_the_sizes(tmp_path, hf_cache):
    path = task_dir(tmp_path, rows(3), yaml="file: rows.jsonl\nsplit_ratios: {support: 0.9, eval: 0.1}\n")
    message = user_error(path, cache_dir=hf_cache)
    assert "eval" in message and "support 3, train 0, eval 0" in message


def test_split_column_without_support_rows_names_the_sizes(tmp_path, hf_cache):
    data = "question,answer,split\nq,a,eval\nr,b,train\ns,c,eval\n"
    path = task_dir(tmp_path, data, name="rows.csv", yaml="file: rows.csv\nsplit_column: split\n")
    message = user_error(path, cache_dir=hf_cache)
    assert "support split is empty" in message and "support 0, train 1, eval 2" in message


def test_missing_eval_split_is_a_user_error_with_sizes(tmp_path, hf_cache):
    task = load_task(str(task_dir(tmp_path, rows(4))), cache_dir=hf_cache, train_size=2)
    with pytest.raises(UserError) as err:
        task.split("eval")
    assert isinstance(err.value, ValueError)  # callers that caught ValueError still do
    assert "no eval split" in str(err.value) and "support (4 examples), train (2 examples)" in str(err.value)


# --- official files -----------------------------------------------------------------------------


def test_empty_official_annotation_file_is_named(tmp_path, hf_cache):
    root = tmp_path / "data"
    (root / "vqav2").mkdir(parents=True)
    questions = {"questions": [{"image_id": 1, "question": "Q?", "question_id": 10}]}
    for split in ("train", "val"):
        (root / "vqav2" / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps(questions))
        (root / "vqav2" / f"v2_mscoco_{split}2014_annotations.json").write_text("")
    with pytest.raises(UserError) as err:
        load_task("vqav2", data_root=str(root), cache_dir=hf_cache, train_size=1).split("support")
    assert "v2_mscoco_train2014_annotations.json" in str(err.value) and "empty" in str(err.value)
