"""User task YAMLs naming a Hugging Face dataset (``hub:``): rows mapped and checked as a data file's,
split by blocks, ratios or a column. Nothing downloads: ``datasets.load_dataset`` (as
``pipeline.tasks.hub`` calls it) is replaced by in-memory datasets built here, except in the offline
test, which runs the real one with HF_HUB_OFFLINE=1 and an empty cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import ConfigError, UserError  # noqa: E402
from pipeline.tasks import load_task  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"

TEXT_FEATURES = datasets.Features(
    {
        "qid": datasets.Value("int64"),
        "prompt": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "part": datasets.Value("string"),
    }
)
TEXT_ROWS = [
    {"qid": 100 + i, "prompt": f"capital of c{i}", "answers": [f"city{i}", f"town{i}"], "part": "support"}
    for i in range(10)
]
VQA_FEATURES = datasets.Features(
    {
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
        "answers": datasets.List({"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}),
    }
)
COLOURS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def vqa_rows(start: int, names: list[str]) -> list[dict]:
    return [
        {
            "question_id": start + i,
            "question": f"What colour is picture {start + i}?",
            "image": Image.new("RGB", (6, 4), COLOURS[name]),
            "answers": [{"answer": name, "answer_id": j} for j in range(3)],
        }
        for i, name in enumerate(names)
    ]


class FakeHub:
    """``datasets.load_dataset`` over in-memory datasets keyed by (id, split); records each call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tables: dict[tuple[str, str], datasets.Dataset]):
        self.tables, self.calls = tables, []
        monkeypatch.setattr(datasets, "load_dataset", self)

    def __call__(self, path, name=None, *, split, revision=None, cache_dir=None):
        self.calls.append({"id": path, "name": name, "split": split, "revision": revision})
        if (path, split) not in self.tables:
            raise FileNotFoundError(f"Dataset '{path}' has no split '{split}'")
        return self.tables[(path, split)]


def text_dataset(rows=TEXT_ROWS, features=TEXT_FEATURES) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=features)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return str(path)


TEXT_YAML = """\
kind: text
prompt: "{{question}} ->"
hub:
  id: someone/capitals
  split: train
  revision: v1.0
  columns: {{id: qid, question: prompt, answers: answers}}
{extra}"""


def as_tuple(example) -> tuple:
    return (example.id, example.question, example.answers)


def expected(rows, question="prompt", id_="qid") -> set[tuple]:
    """What each row must become, written from the rows themselves."""
    return {(str(r[id_]), r[question], tuple(r["answers"])) for r in rows}


def test_text_task_from_one_split_by_ratios(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset()})
    task = load_task(write(tmp_path, TEXT_YAML.format(extra="split_ratios: {support: 0.8, eval: 0.2}\n")))
    assert (task.spec.kind, task.spec.metric) == ("text", "exact_match")
    support, ev = task.split("support"), task.split("eval")
    assert (len(support), len(ev)) == (8, 2)
    got = [as_tuple(e) for e in [*support, *ev]]
    assert len(set(got)) == 10 and set(got) == expected(TEXT_ROWS)
    assert all(e.image is None for e in support)
    assert [e.id for e in task.split("train")] == [e.id for e in support]  # no train split: the support
    assert hub.calls == [{"id": "someone/capitals", "name": None, "split": "train", "revision": "v1.0"}]
    again = load_task(write(tmp_path, TEXT_YAML.format(extra="split_ratios: {support: 0.8, eval: 0.2}\n")))
    assert again.split("eval").ids() == ev.ids()  # seeded: the same carving every time


def test_text_task_split_column(tmp_path, monkeypatch):
    rows = [{**r, "part": ("eval" if i >= 7 else "support")} for i, r in enumerate(TEXT_ROWS)]
    FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset(rows)})
    task = load_task(write(tmp_path, TEXT_YAML.format(extra="split_column: part\n")))
    assert {as_tuple(e) for e in task.split("support")} == expected(rows[:7])
    assert {as_tuple(e) for e in task.split("eval")} == expected(rows[7:])


def test_image_task_one_block_per_split(tmp_path, monkeypatch):
    support_rows, eval_rows = vqa_rows(1, ["red", "green", "blue"]), vqa_rows(50, ["white", "red"])
    FakeHub(
        monkeypatch,
        {
            ("someone/vqa", "train"): datasets.Dataset.from_list(support_rows, features=VQA_FEATURES),
            ("someone/vqa", "validation"): datasets.Dataset.from_list(eval_rows, features=VQA_FEATURES),
        },
    )
    columns = "{id: question_id, question: question, answers: answers, image: image}"
    yaml = (
        "hub:\n"
        f"  support: {{id: someone/vqa, split: train, columns: {columns}, answer_key: answer}}\n"
        f"  eval: {{id: someone/vqa, split: validation, columns: {columns}, answer_key: answer}}\n"
    )
    task = load_task(write(tmp_path, yaml))
    assert (task.spec.kind, task.spec.metric) == ("vqa", "vqa_accuracy")
    for split, rows in (("support", support_rows), ("eval", eval_rows)):
        examples = list(task.split(split))
        assert [as_tuple(e) for e in examples] == [
            (str(r["question_id"]), r["question"], tuple(a["answer"] for a in r["answers"])) for r in rows
        ]
        for example, row in zip(examples, rows, strict=True):
            assert example.image.size == row["image"].size
            assert example.image.convert("RGB").tobytes() == row["image"].tobytes()
    assert task.split("train").ids() == task.split("support").ids()


def test_revision_changes_the_recorded_fingerprint(tmp_path, monkeypatch):
    FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset()})

    def fingerprint(extra: str) -> str:
        text = TEXT_YAML.format(extra="split_ratios: {support: 1.0}\n" + extra)
        return load_task(write(tmp_path, text)).split("support").dataset._fingerprint

    first = fingerprint("")
    assert fingerprint("") == first
    pinned = write(tmp_path, TEXT_YAML.replace("v1.0", "v2.0").format(extra="split_ratios: {support: 1.0}\n"))
    assert load_task(pinned).split("support").dataset._fingerprint != first


def one_line(error: type[Exception], yaml: str, tmp_path) -> str:
    with pytest.raises(error) as caught:
        load_task(write(tmp_path, yaml))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


RATIOS = "split_ratios: {support: 0.8, eval: 0.2}\n"


@pytest.mark.parametrize(
    ("yaml", "error", "wanted"),
    [
        (  # no split rule for one dataset split
            TEXT_YAML.format(extra=""),
            ConfigError,
            ["`hub` with one dataset split needs exactly one of `split_column` or `split_ratios`"],
        ),
        (
            TEXT_YAML.format(extra=RATIOS + "file: data.jsonl\n"),
            ConfigError,
            ["give either `files`", "or `hub`"],
        ),
        (
            TEXT_YAML.replace("answers: answers", "").format(extra=RATIOS),
            ConfigError,
            ["hub.columns.answers is missing"],
        ),
        (
            TEXT_YAML.replace("question: prompt, ", "").format(extra=RATIOS),
            ConfigError,
            ["hub.columns.question is missing"],
        ),
        (
            TEXT_YAML.replace("revision: v1.0", "revision: 1234567").format(extra=RATIOS),
            ConfigError,
            ["hub.revision: got 1234567", "quote it"],
        ),
        (
            TEXT_YAML.format(extra=RATIOS + "fields: {question: prompt}\n"),
            ConfigError,
            ["`fields`", "under `columns:` in its `hub` block"],
        ),
        (
            "hub:\n  eval: {id: someone/capitals, split: train, columns: {id: qid, question: prompt, answers: answers}}\n",
            ConfigError,
            ["'hub' must include a support split"],
        ),
        (
            TEXT_YAML.replace("split: train", "split: train\n  typo: 1").format(extra=RATIOS),
            ConfigError,
            ["hub: unknown key 'typo'"],
        ),
        (
            TEXT_YAML.replace("question: prompt", "question: text").format(extra=RATIOS),
            UserError,
            ["hub.columns.question", "'text'", "someone/capitals", "its columns: qid, prompt, answers, part"],
        ),
        (
            TEXT_YAML.replace("split: train", "split: test").format(extra=RATIOS),
            UserError,
            ["could not load HF dataset 'someone/capitals' split 'test'"],
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, monkeypatch, yaml, error, wanted):
    FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset()})
    message = one_line(error, yaml, tmp_path)
    for part in wanted:
        assert part in message, (part, message)


def bad_rows(**changes) -> list[dict]:
    """The text rows with row 4 (1-based) changed."""
    return [{**r, **changes} if i == 3 else r for i, r in enumerate(TEXT_ROWS)]


@pytest.mark.parametrize(
    ("rows", "features", "wanted"),
    [
        (bad_rows(prompt=None), TEXT_FEATURES, "row 4: column 'prompt' (hub.columns.question) is missing or empty"),
        (bad_rows(prompt="  "), TEXT_FEATURES, "row 4: column 'prompt' (hub.columns.question) is missing or empty"),
        (bad_rows(answers=[]), TEXT_FEATURES, "row 4: column 'answers' (hub.columns.answers) is missing or empty"),
        (
            bad_rows(answers=["x", None]),
            TEXT_FEATURES,
            "row 4: column 'answers' (hub.columns.answers) is a list holding null",
        ),
        (bad_rows(qid=101), TEXT_FEATURES, "row 4: id '101' repeats row 2"),
        (
            [{**r, "prompt": [r["prompt"]]} for r in TEXT_ROWS],
            datasets.Features({**TEXT_FEATURES, "prompt": datasets.List(datasets.Value("string"))}),
            "row 1: column 'prompt' (hub.columns.question) is a JSON array",
        ),
        (
            [{**r, "qid": r["qid"] + 0.5} for r in TEXT_ROWS],
            datasets.Features({**TEXT_FEATURES, "qid": datasets.Value("float64")}),
            "row 1: column 'qid' (hub.columns.id) is a fractional number (100.5)",
        ),
    ],
)
def test_bad_rows_are_one_line_naming_row_column_and_key(tmp_path, monkeypatch, rows, features, wanted):
    FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset(rows, features)})
    message = one_line(UserError, TEXT_YAML.format(extra=RATIOS), tmp_path)
    assert message.startswith("HF dataset 'someone/capitals' split 'train' revision 'v1.0' row ")
    assert wanted in message, message


def test_number_answer_column_is_one_answer_as_text(tmp_path, monkeypatch):
    """An integer answers column (a count) was a TypeError ('int' object is not iterable); each value is
    one answer, spelt as a data file's numbers are."""
    rows = [{**r, "count": i, "ratio": i + 0.5 if i % 2 else float(i)} for i, r in enumerate(TEXT_ROWS)]
    features = datasets.Features({**TEXT_FEATURES, "count": datasets.Value("int64"), "ratio": datasets.Value("float64")})
    FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset(rows, features)})
    for column, spelt in (("count", lambda i: str(i)), ("ratio", lambda i: f"{i}.5" if i % 2 else str(i))):
        task = load_task(write(tmp_path, TEXT_YAML.replace("answers: answers", f"answers: {column}").format(extra=RATIOS)))
        got = {e.id: e.answers for e in [*task.split("support"), *task.split("eval")]}
        assert got == {str(100 + i): (spelt(i),) for i in range(10)}


def test_bad_image_and_answer_columns(tmp_path, monkeypatch):
    rows = vqa_rows(1, ["red", "green"])
    as_paths = [{**r, "image": f"img{i}.png"} for i, r in enumerate(rows)]
    path_features = datasets.Features({**VQA_FEATURES, "image": datasets.Value("string")})
    no_answer = [rows[0], {**rows[1], "answers": [{"answer": "", "answer_id": 0}]}]
    FakeHub(
        monkeypatch,
        {
            ("a/vqa", "train"): datasets.Dataset.from_list(rows, features=VQA_FEATURES),
            ("a/paths", "train"): datasets.Dataset.from_list(as_paths, features=path_features),
            ("a/empty", "train"): datasets.Dataset.from_list(no_answer, features=VQA_FEATURES),
        },
    )
    yaml = (
        "hub:\n  support:\n    id: {id}\n    split: train\n{key}"
        "    columns: {{id: question_id, question: question, answers: answers, image: image}}\n"
    )
    message = one_line(UserError, yaml.format(id="a/paths", key="    answer_key: answer\n"), tmp_path)
    assert "column 'image' (hub.support.columns.image)" in message and "expected an Image column" in message
    message = one_line(UserError, yaml.format(id="a/vqa", key=""), tmp_path)  # dicts, no answer_key
    assert "column 'answers' (hub.support.columns.answers) is a list of mappings (keys: answer, answer_id)" in message
    assert "give hub.support.answer_key" in message
    message = one_line(UserError, yaml.format(id="a/vqa", key="    answer_key: text\n"), tmp_path)
    assert "answer_key 'text' needs a list of mappings" in message and "hub.support.answer_key" in message
    message = one_line(UserError, yaml.format(id="a/empty", key="    answer_key: answer\n"), tmp_path)
    assert "row 2: column 'answers' (hub.support.columns.answers)" in message and "missing or empty" in message


def test_ratio_leaving_a_split_empty_names_the_dataset(tmp_path, monkeypatch):
    FakeHub(monkeypatch, {("someone/capitals", "train"): text_dataset()})
    message = one_line(
        UserError, TEXT_YAML.format(extra="split_ratios: {support: 0.98, eval: 0.02}\n"), tmp_path
    )
    assert "leaves eval with no rows of the 10 in HF dataset 'someone/capitals' split 'train'" in message


def test_offline_without_a_cached_copy_is_one_line(tmp_path, monkeypatch):
    """The real ``datasets.load_dataset``, offline, with an empty cache: nothing to read, one line."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yaml = TEXT_YAML.replace("someone/capitals", "mimic-pipeline-tests/absent").format(extra=RATIOS)
    path = write(tmp_path, yaml)
    with pytest.raises(UserError) as caught:
        load_task(path, cache_dir=str(tmp_path / "hf-cache"))
    message = str(caught.value)
    assert "\n" not in message and "'mimic-pipeline-tests/absent'" in message
    assert "Without network" in message


def test_readme_example_loads(tmp_path, monkeypatch):
    """The README's `hub:` example, as written, over a dataset with the columns it names."""
    text = README.read_text()
    block = re.search(r"A Hugging Face dataset instead of files.*?```yaml\n(.*?)```", text, re.S).group(1)
    rows = vqa_rows(0, ["red", "green", "blue", "white", "red"])
    table = datasets.Dataset.from_list(
        [{**r, "answers": [a["answer"] for a in r["answers"]]} for r in rows],
        features=datasets.Features({**VQA_FEATURES, "answers": datasets.List(datasets.Value("string"))}),
    )
    hub = FakeHub(monkeypatch, {("your-name/your-vqa", "validation"): table})
    task = load_task(write(tmp_path, block))
    assert (len(task.split("support")), len(task.split("eval"))) == (4, 1)
    assert hub.calls == [{"id": "your-name/your-vqa", "name": None, "split": "validation", "revision": "v1.0"}]
    assert task.spec.kind == "vqa" and len(block.strip().splitlines()) == 6
