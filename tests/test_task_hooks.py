"""Task YAML hooks (``!function module.name``) and ``include:``: one task config for every task, with its
parts replaceable by small Python functions beside the YAML (lmms-eval style)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import tiny

from pipeline.config import ConfigError, UserError
from pipeline.tasks import TASKS_DIR, load_task, task_names
from pipeline.tasks.builtin_text import read_text_task_file, split_examples

REPO = Path(__file__).resolve().parents[1]

ROWS = [("sun", "suns"), ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("bus", "buses"), ("cup", "cups"),
        ("pen", "pens"), ("hat", "hats"), ("map", "maps"), ("bed", "beds"), ("car", "cars"), ("egg", "eggs")]

UTILS = '''
def prompt(example):
    return "Plural of " + example.question.upper() + ":"


def clean(generated):
    return generated.strip().split()[0].lower() if generated.strip() else ""


def score(prediction, answers):
    return 1.0 if prediction in answers else (0.5 if prediction[:2] == answers[0][:2] else 0.0)


def load(config):
    from pipeline.tasks import Example

    rows = [Example(f"w{i}", w, (w + "s",)) for i, w in enumerate(["a", "b", "c", "d", "e"])]
    return {"support": rows[:3], "eval": rows[3:]}
'''


def write_task(folder: Path, body: str, utils: str = UTILS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "question": q, "answer": a}) + "\n"
                                               for i, (q, a) in enumerate(ROWS)))
    (folder / "utils.py").write_text(utils)
    (folder / "task.yaml").write_text(body)
    return folder / "task.yaml"


HOOKED = """
include: base.yaml
file: data.jsonl
split_ratios: {support: 0.5, eval: 0.5}
prompt: !function utils.prompt
postprocess: !function utils.clean
metric: !function utils.score
"""
BASE = "kind: text\nanswer: ' {answer}'\nmax_new_tokens: 4\nprompt: 'never used {question}'\n"


def test_include_merges_and_the_including_file_wins(tmp_path):
    path = write_task(tmp_path, HOOKED)
    (tmp_path / "base.yaml").write_text(BASE)
    task = load_task(str(path))
    spec = task.spec
    assert (spec.kind, spec.answer, spec.max_new_tokens) == ("text", " {answer}", 4)  # from base.yaml
    assert str(spec.prompt) == "!function utils.prompt"  # the including file's key wins
    assert len(task.split("support")) + len(task.split("eval")) == len(ROWS)


def test_include_of_a_shared_template_and_the_words_reader(tmp_path):
    (tmp_path / "w.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "input": q, "answer": a}) + "\n"
                                              for i, (q, a) in enumerate(ROWS)))
    (tmp_path / "mine.yaml").write_text("include: _words\nfile: w.jsonl\n")
    task = load_task(str(tmp_path / "mine.yaml"))
    assert (task.spec.prompt, task.spec.metric, task.spec.kind) == ("{question} ->", "exact_match", "text")
    want = split_examples(read_text_task_file(tmp_path / "w.jsonl"))  # the hash rule, by the reader's parser
    for split in ("support", "train", "eval"):
        assert [e.id for e in task.split(split)] == [e.id for e in want[split]]


def test_include_errors_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(UserError, match=r"includes itself .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_task(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("include: nowhere\n")
    with pytest.raises(UserError, match=r"include 'nowhere' not found .*_words"):
        load_task(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("include: [1]\n")
    with pytest.raises(UserError, match="must be a file name or a list"):
        load_task(str(tmp_path / "d.yaml"))


def test_prompt_postprocess_and_metric_hooks(tmp_path):
    path = write_task(tmp_path, HOOKED)
    (tmp_path / "base.yaml").write_text(BASE)
    task = load_task(str(path))
    example = task.split("support")[0]
    assert task.spec.query_text(example) == f"Plural of {example.question.upper()}:"
    assert task.postprocess("  Cats are\nnice") == "cats"
    digest = hashlib.sha256((tmp_path / "utils.py").read_bytes()).hexdigest()
    assert task.spec.prompt_id == f"!function utils.prompt sha256:{digest[:16]}"
    scored = task.score(["cats", "cax", "dog"], [("cats",), ("cats",), ("cats",)])
    assert scored["per_sample"] == [100.0, 50.0, 0.0] and scored["score"] == pytest.approx(50.0)
    assert scored["metric"] == f"!function utils.score sha256:{digest[:16]}"


def test_prompt_id_follows_the_hook_source(tmp_path):
    path = write_task(tmp_path, HOOKED)
    (tmp_path / "base.yaml").write_text(BASE)
    before = load_task(str(path)).spec.prompt_id
    (tmp_path / "utils.py").write_text(UTILS.replace("Plural of", "Plural:"))
    assert load_task(str(path)).spec.prompt_id != before


@pytest.mark.parametrize(("utils", "call", "message"), [
    (UTILS.replace("return 1.0 if", "return 2.0 if"), "score", r"returned 2\.0 .*number in \[0, 1\]"),
    (UTILS.replace("return 1.0 if", "return 'yes' if"), "score", r"returned 'yes'"),
    (UTILS.replace('return "Plural of " + example.question.upper() + ":"', "return 3"), "prompt",
     r"prompt hook !function utils.prompt returned int"),
    (UTILS.replace("def clean(", "def clean_(", 1), "postprocess", r"utils has no function 'clean'"),
    (UTILS + "\ndef broken(:\n", "postprocess", r"importing .*utils.py failed: SyntaxError"),
])
def test_a_faulty_hook_is_a_one_line_error(tmp_path, utils, call, message):
    path = write_task(tmp_path, HOOKED, utils)
    (tmp_path / "base.yaml").write_text(BASE)
    with pytest.raises(UserError, match=message):  # an import or name fault at load, a bad value at the call
        task = load_task(str(path))
        if call == "score":
            task.score(["cats"], [("cats",)])
        elif call == "prompt":
            task.spec.query_text(task.split("support")[0])
        else:
            task.postprocess("cats")


def test_missing_hook_module_and_bad_types(tmp_path):
    path = write_task(tmp_path, "file: data.jsonl\nsplit_ratios: {support: 1.0}\nprompt: !function nomod.fn\n")
    with pytest.raises(UserError, match=r"no nomod\.py beside it and no importable module 'nomod'"):
        load_task(str(path))  # refused when the task is loaded, before any model
    path.write_text("file: data.jsonl\nsplit_ratios: {support: 1.0}\nprompt: 5\n")
    with pytest.raises(ConfigError, match="'prompt': got 5"):
        load_task(str(path))
    path.write_text("file: data.jsonl\nsplit_ratios: {support: 1.0}\nloader: spreadsheet\n")
    with pytest.raises(ConfigError, match="'loader': got 'spreadsheet'"):
        load_task(str(path))


def test_loader_hook(tmp_path):
    path = write_task(tmp_path, "loader: !function utils.load\n")
    task = load_task(str(path))
    assert [e.id for e in task.split("support")] == ["w0", "w1", "w2"]
    assert [e.id for e in task.split("train")] == ["w0", "w1", "w2"]  # no train split: the support split
    assert [e.answers for e in task.split("eval")] == [("ds",), ("es",)]
    assert task.spec.kind == "text"  # no images
    write_task(tmp_path, "loader: !function utils.load\n", UTILS.replace('return {"support"', 'return {"dev"'))
    with pytest.raises(UserError, match="expected a dict of splits"):
        load_task(str(path))


def test_builtin_tasks_are_yaml_files_too():
    for name in ("plurals", "antonyms", "shapes_group_vqa", "vqav2"):
        assert (TASKS_DIR / f"{name}.yaml").is_file()
    assert (TASKS_DIR / "_words.yaml").is_file() and "_words" not in task_names()  # a template, not a task


def test_a_hooked_task_runs_through_the_cli(tmp_path, warm_pipeline):
    """teacher-cache records the hook prompt's identity; evaluate scores with the hook metric (each record's
    score recomputed here from the prediction); an edited prompt hook makes the store stale."""
    path = write_task(tmp_path / "task", HOOKED)
    (tmp_path / "task" / "base.yaml").write_text(BASE)
    fam = tiny("llama")
    model = tmp_path / "model"
    fam.model.save_pretrained(model)
    fam.processor.save_pretrained(model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def pipeline(*args, ok=True):  # a process of its own, forked from a server that imported torch (conftest)
        res = warm_pipeline.run(list(map(str, args)), env=env, cwd=tmp_path, timeout=300)
        assert (res.returncode == 0) == ok, res.stderr[-3000:]
        return res

    store = tmp_path / "s.zarr"
    pipeline("teacher-cache", "--task", path, "--model", model, "--shots", 2, "--n-queries", 4, "--out", store,
             "--device", "cpu")
    zattrs = json.loads((store / "zarr.json").read_text())["attributes"]
    digest = hashlib.sha256((tmp_path / "task" / "utils.py").read_bytes()).hexdigest()[:16]
    assert json.dumps(zattrs).count(f"!function utils.prompt sha256:{digest}") >= 1
    pipeline("evaluate", "--task", path, "--model", model, "--modes", "zero-shot", "--n-queries", 3,
             "--device", "cpu", "--results-dir", tmp_path / "results")
    result = json.loads(next((tmp_path / "results").rglob("zero-shot*.json")).read_text())
    assert result["metric"] == f"!function utils.score sha256:{digest}"
    sys.path.insert(0, str(tmp_path / "task"))
    try:
        import utils as hooks  # the hook file itself, imported here to recompute each score
    finally:
        sys.path.pop(0)
        sys.modules.pop("utils", None)
    for record in result["records"]:
        assert record["score"] == 100.0 * hooks.score(record["prediction"], tuple(record["answers"]))
    (tmp_path / "task" / "utils.py").write_text(UTILS.replace("Plural of", "Plural:"))
    res = pipeline("train-student", "--cache", store, "--device", "cpu", "--epochs", 1, ok=False)
    assert "prompt template" in res.stderr and "re-run teacher-cache" in res.stderr
    assert "Traceback" not in res.stderr


def test_task_yaml_numbers_read_as_yaml_1_2(tmp_path):
    """`1e3` in a task file is a number (YAML 1.2), as in every other YAML the tool reads."""
    path = write_task(tmp_path, "file: data.jsonl\nsplit_ratios: {support: 1.0}\nmax_new_tokens: 1e1\n")
    with pytest.raises(ConfigError, match="'max_new_tokens': got 10.0"):  # a float where an int is wanted
        load_task(str(path))
    path.write_text("file: data.jsonl\nsplit_ratios: {support: 5e-1, eval: 5e-1}\n")
    task = load_task(str(path))
    assert len(task.split("support")) == len(task.split("eval")) == len(ROWS) // 2
