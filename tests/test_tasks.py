"""Task registry and loaders: official VQAv2 / OK-VQA / Karpathy files, hub mapping, user YAML tasks."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import ConfigError, UserError, load_config, read_yaml  # noqa: E402
from pipeline.tasks import TASKS_DIR, TaskConfig, load_task, most_frequent_answer, task_names, task_spec  # noqa: E402
from pipeline.tasks.hooks import read_task_yaml  # noqa: E402
from pipeline.tasks.hub import check_source  # noqa: E402

VQA_FILES = {
    "vqav2": ("v2_OpenEnded_mscoco_{s}2014_questions.json", "v2_mscoco_{s}2014_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{s}2014_questions.json", "mscoco_{s}2014_annotations.json"),
}


def jpeg(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, "JPEG")


def write_vqa(root, task, split, rows, images=True):
    """rows: (question_id, image_id, question, answers); questions written in reverse order."""
    qname, aname = (n.format(s=split) for n in VQA_FILES[task])
    (root / task).mkdir(parents=True, exist_ok=True)
    questions = [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _ in rows][::-1]
    annotations = [
        {
            "question_id": qid,
            "image_id": i,
            "question_type": "what",
            "answer_type": "other",
            "multiple_choice_answer": a[0],
            "answers": [
                {"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(a)
            ],
        }
        for qid, i, _, a in rows
    ]
    (root / task / qname).write_text(json.dumps({"info": {}, "questions": questions}))
    (root / task / aname).write_text(json.dumps({"info": {}, "annotations": annotations}))
    if images:
        for _, i, _, _ in rows:
            jpeg(root / "coco" / f"{split}2014" / f"COCO_{split}2014_{i:012d}.jpg")


def vqa_rows(start, n):
    return [(start + k, 100 + start + k, f"What is {k}?", (f"ans{k}",) * 9 + ("other",)) for k in range(n)]


pytestmark = pytest.mark.usefixtures("no_data_env")  # conftest.py


# --- registry ---------------------------------------------------------------------------------


def test_every_shipped_task_yaml_loads():
    paths = [p for p in sorted(TASKS_DIR.glob("*.yaml")) if not p.stem.startswith("_")]  # _x: shared templates
    assert {p.stem for p in paths} >= {"vqav2", "okvqa", "coco_caption", "shapes_vqa", "shapes_caption", "plurals"}
    for path in paths:
        cfg = load_config(TaskConfig, {"name": path.stem, **read_task_yaml(path, TASKS_DIR)})
        spec = task_spec(cfg.name, cfg.kind, cfg.metric, cfg.prompt, cfg.answer, cfg.max_new_tokens)
        if cfg.loader in ("vqa", "karpathy", "ocr_vqa"):
            assert not [e for w in ("support", "eval") for e in check_source(cfg.name, w, cfg.hub.get(w))]
        assert path.stem in task_names()
        assert spec.metric == {"words": "exact_match", "karpathy": "cider", "ocr_vqa": "exact_match",
                               "mme": "mme_accuracy", "seed_bench": "seed_accuracy"}.get(
            cfg.loader, "cider" if cfg.kind == "caption" else "vqa_accuracy")
    vqa = load_config(TaskConfig, read_yaml(TASKS_DIR / "vqav2.yaml"))
    assert (vqa.prompt, vqa.answer, vqa.metric, vqa.max_new_tokens) == (
        "Question:{question} Short answer:",
        " {answer}",
        "vqa_accuracy",
        10,
    )
    coco = load_config(TaskConfig, read_yaml(TASKS_DIR / "coco_caption.yaml"))
    assert (coco.prompt, coco.metric, coco.max_new_tokens) == ("Caption:", "cider", 20)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        load_task("vqa3")
    for name in ("vqav2", "okvqa", "coco_caption", "shapes_vqa", "shapes_caption"):
        assert name in str(err.value)
    assert "YAML" in str(err.value)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="'bogus'"):
        load_task("shapes_vqa", bogus=1)
    with pytest.raises(ConfigError, match="train_size"):
        load_task("shapes_vqa", train_size=0)
    with pytest.raises(ConfigError, match="placeholder"):
        load_task("shapes_vqa", prompt="Q:{question} {hint}")


# --- official files ---------------------------------------------------------------------------


def test_vqav2_official(tmp_path, hf_cache):
    write_vqa(tmp_path, "vqav2", "train", vqa_rows(1000, 6))
    write_vqa(tmp_path, "vqav2", "val", vqa_rows(5000, 4))
    task = load_task("vqav2", data_root=str(tmp_path), train_size=3, eval_size=2, cache_dir=hf_cache)
    support = task.split("support")
    assert len(support) == 6 and support.ids() == [str(1000 + k) for k in range(6)]
    first = support[0]
    assert (first.id, first.question) == ("1000", "What is 0?")  # joined by id, not by file order
    assert first.answers == ("ans0",) * 9 + ("other",) and task.demo_answer(first) == "ans0"
    assert first.image == str(tmp_path / "coco/train2014/COCO_train2014_000000001100.jpg")
    assert Image.open(first.image).size == (8, 8)
    train = task.split("train")
    assert len(train) == 3 and set(train.ids()) <= set(support.ids())
    again = load_task("vqav2", data_root=str(tmp_path), train_size=3, eval_size=2, cache_dir=hf_cache)
    assert again.split("train").ids() == train.ids()
    ev = task.split("eval")
    assert len(ev) == 2 and set(ev.ids()) <= {str(5000 + k) for k in range(4)}
    assert "val2014" in ev[0].image
    assert [e.id for e in support[1:3]] == ["1001", "1002"] and support[-1].id == "1005"
    assert first.meta == {"answer_type": "other"}  # the annotation's answer type, for the per-type report


def test_vqa_accuracy_by_answer_type_reaches_the_payload_and_the_table():
    from pipeline.tasks.base import Example
    from stages.evaluate import answer_type_table
    from stages.evaluation import answer_type_scores

    examples = [Example("1", "q", ("yes",) * 10, meta={"answer_type": "yes/no"}),
                Example("2", "q", ("2",) * 10, meta={"answer_type": "number"}),
                Example("3", "q", ("red",) * 3 + ("blue",) * 7, meta={"answer_type": "other"}),
                Example("4", "q", ("no",) * 10, meta={"answer_type": "yes/no"})]
    records = [{"prediction": p, "answers": list(e.answers)} for p, e in zip(("yes", "3", "red", "yes"), examples, strict=True)]
    scores = answer_type_scores("vqa_accuracy", examples, records)
    # yes/no: (100 + 0) / 2 = 50; number: 0; other: "red" is 3 of the 10 answers, and the official accuracy
    # averages min(1, matches / 3) over the ten leave-one-out subsets: the 7 that drop a "blue" keep 3 reds
    # (1 each), the 3 that drop a "red" keep 2 (2/3 each): (7 + 2) / 10 = 0.9 -> 90;
    # overall (100 + 0 + 90 + 0) / 4 = 47.5
    assert scores == pytest.approx({"overall": 47.5, "yes/no": 50.0, "number": 0.0, "other": 90.0})
    assert answer_type_scores("exact_match", examples, records) is None
    untyped = [Example("5", "q", ("yes",))]
    assert answer_type_scores("vqa_accuracy", untyped, records[:1]) is None
    table = answer_type_table([{"mode": "zero-shot", "name": "zero-shot", "by_answer_type": scores}])
    assert table[3] == "| mode | overall | yes/no | number | other |"
    assert table[5].endswith("| 47.50 | 50.00 | 0.00 | 90.00 |")


def test_okvqa_keeps_doubled_answers(tmp_path, hf_cache):
    five = ["race", "race", "motocross", "ride", "bike"]
    doubled = tuple(a for a in five for _ in range(2))
    write_vqa(tmp_path, "okvqa", "train", [(2971475, 297147, "What sport can you use this for?", doubled)])
    write_vqa(tmp_path, "okvqa", "val", [(42, 7, "Why?", ("because",) * 10)])
    task = load_task("okvqa", data_root=str(tmp_path), train_size=1, cache_dir=hf_cache)
    example = task.split("support")[0]
    assert len(example.answers) == 10 and example.answers.count("race") == 4
    assert most_frequent_answer(example.answers) == "race"
    assert task.split("eval")[0].answers == ("because",) * 10


def test_karpathy_split(tmp_path, hf_cache):
    def image(cocoid, split, folder):
        jpeg(tmp_path / "coco" / folder / f"COCO_{folder}_{cocoid:012d}.jpg")
        return {
            "filepath": folder,
            "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
            "imgid": cocoid,
            "split": split,
            "cocoid": cocoid,
            "sentids": [1, 2],
            "sentences": [
                {"raw": f"A photo {cocoid}. ", "tokens": ["a"], "imgid": cocoid, "sentid": 1},
                {"raw": "Another caption.", "tokens": ["b"], "imgid": cocoid, "sentid": 2},
            ],
        }

    images = [
        image(1, "train", "train2014"),
        image(2, "restval", "val2014"),
        image(3, "val", "val2014"),
        image(4, "test", "val2014"),
        image(5, "test", "val2014"),
    ]
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    task = load_task("coco_caption", data_root=str(tmp_path), train_size=2, cache_dir=hf_cache)
    assert task.split("support").ids() == ["1", "2"]
    assert task.split("eval").ids() == ["4", "5"]
    example = task.split("eval")[0]
    assert example.answers == ("A photo 4.", "Another caption.") and example.question == ""
    assert example.image == str(tmp_path / "coco/val2014/COCO_val2014_000000000004.jpg")
    assert task.spec.kind == "caption" and task.postprocess(" A dog.\nnext") == "A dog."


def test_missing_annotation_file_names_the_path(tmp_path, hf_cache):
    write_vqa(tmp_path, "vqav2", "train", vqa_rows(1000, 2))
    write_vqa(tmp_path, "vqav2", "val", vqa_rows(5000, 2))
    missing = tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json"
    missing.unlink()
    with pytest.raises(UserError) as err:
        load_task("vqav2", data_root=str(tmp_path), cache_dir=hf_cache)
    assert str(missing) in str(err.value) and "--data-root" in str(err.value)


def test_missing_image_named_at_load_and_at_access(tmp_path, hf_cache):
    write_vqa(tmp_path, "vqav2", "train", vqa_rows(1000, 6))
    write_vqa(tmp_path, "vqav2", "val", vqa_rows(5000, 2))
    late = tmp_path / "coco/train2014/COCO_train2014_000000001105.jpg"
    late.unlink()
    task = load_task("vqav2", data_root=str(tmp_path), train_size=2, cache_dir=hf_cache)
    support = task.split("support")  # the first rows are fine
    with pytest.raises(UserError, match=str(late)):
        support[5]
    first = tmp_path / "coco/val2014/COCO_val2014_000000005100.jpg"
    first.unlink()
    with pytest.raises(UserError, match=str(first)):
        task.split("eval")


def test_data_root_from_env_and_option(tmp_path, hf_cache, monkeypatch):
    write_vqa(tmp_path, "vqav2", "train", vqa_rows(1000, 2))
    write_vqa(tmp_path, "vqav2", "val", vqa_rows(5000, 2))
    monkeypatch.setenv("MIMIC_DATA", str(tmp_path))
    assert len(load_task("vqav2", train_size=1, cache_dir=hf_cache).split("support")) == 2
    with pytest.raises(UserError, match="elsewhere"):
        load_task("vqav2", data_root=str(tmp_path / "elsewhere"), cache_dir=hf_cache)
    with pytest.raises(UserError, match="train_size"):
        load_task("vqav2", cache_dir=hf_cache).split("train")  # 1000 > 2 questions


# --- hub --------------------------------------------------------------------------------------


def test_hub_offline_error_names_alternatives(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'lmms-lab/VQAv2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = load_task("vqav2", source="hub")
    with pytest.raises(UserError) as err:
        task.split("eval")
    message = str(err.value)
    assert "lmms-lab/VQAv2" in message and "--data-root" in message and "user YAML" in message


def test_hub_column_mapping_in_memory(tmp_path):
    import datasets

    from pipeline.tasks.hub import hub_view

    rows = [
        {
            "question_id": 7,
            "question": "What colour?",
            "image_id": 3,
            "image": Image.new("RGB", (4, 4), "red"),
            "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(10)],
        }
    ]
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "answers": datasets.List(
                {
                    "answer": datasets.Value("string"),
                    "answer_confidence": datasets.Value("string"),
                    "answer_id": datasets.Value("int64"),
                }
            ),
        }
    )
    ds = datasets.Dataset.from_list(rows, features=features)
    source = {
        "id": "x/vqa",
        "split": "validation",
        "answer_key": "answer",
        "columns": {"id": "question_id", "question": "question", "answers": "answers", "image": "image"},
    }
    example = hub_view(ds, source, tmp_path, "vqav2")[0]
    assert (example.id, example.question, example.answers) == ("7", "What colour?", ("red",) * 10)
    assert example.image.getpixel((0, 0)) == (255, 0, 0)

    jpeg(tmp_path / "coco/train2014/COCO_train2014_000000000003.jpg")
    by_path = {
        **source,
        "columns": {"id": "question_id", "answers": "answers"},
        "image_path": "coco/train2014/COCO_train2014_{image_id:012d}.jpg",
    }
    example = hub_view(ds, by_path, tmp_path, "vqav2")[0]
    assert example.question == "" and example.image.endswith("COCO_train2014_000000000003.jpg")
    with pytest.raises(UserError, match="no column"):
        hub_view(ds, {**source, "columns": {"id": "qid", "answers": "answers"}}, tmp_path, "vqav2")
    assert check_source("t", "eval", {"id": "x", "split": "y", "columns": {"answers": "a"}, "typo": 1}) == [
        "hub.eval: unknown key 'typo' (valid: id, split, columns, name, revision, answer_key, image_path, meta, "
        "one_per_question)",
        "hub.eval.columns.id is missing",
    ]


# --- user tasks -------------------------------------------------------------------------------


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_user_jsonl_text_task(tmp_path, hf_cache):
    rows = [{"input": f"w{i}", "answer": f"a{i}"} for i in range(8)]
    (tmp_path / "support.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[6:]) + "\n")
    yaml_path = write_yaml(
        tmp_path / "words.yaml",
        'prompt: "Word:{question} Answer:"\nmax_new_tokens: 4\n'
        "files: {support: support.jsonl, eval: eval.jsonl}\n",
    )
    task = load_task(yaml_path, cache_dir=hf_cache, train_size=3)
    assert (task.name, task.spec.kind, task.spec.metric, task.spec.max_new_tokens) == (
        "words",
        "text",
        "exact_match",
        4,
    )
    support = task.split("support")
    assert [(e.id, e.question, e.answers, e.image) for e in support[:2]] == [
        ("support-0", "w0", ("a0",), None),
        ("support-1", "w1", ("a1",), None),
    ]
    assert len(task.split("train")) == 3 and set(task.split("train").ids()) <= set(support.ids())
    assert [e.answers for e in task.split("eval")] == [("a6",), ("a7",)]


def test_user_jsonl_with_images(tmp_path, hf_cache):
    data = tmp_path / "data"
    for i in range(3):
        jpeg(data / "img" / f"{i}.jpg")
    rows = [
        {"id": f"x{i}", "question": "Colour?", "answers": ["red"] * 10, "image": f"img/{i}.jpg"}
        for i in range(3)
    ]
    (data / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    yaml_path = write_yaml(tmp_path / "mine.yaml", "files: {support: data/vqa.jsonl, eval: data/vqa.jsonl}\n")
    task = load_task(yaml_path, cache_dir=hf_cache)
    example = task.split("eval")[2]
    assert task.spec.kind == "vqa" and task.spec.metric == "vqa_accuracy"
    assert example.id == "x2" and example.image == str(data / "img" / "2.jpg") and len(example.answers) == 10
    (data / "img" / "2.jpg").unlink()
    with pytest.raises(UserError, match=r"vqa.jsonl line 3: image file .*2.jpg not found"):
        task.split("support")[2]


def test_user_csv_split_column(tmp_path, hf_cache):
    (tmp_path / "all.csv").write_text(
        "question,answers,split\nOne?,1|one,support\nTwo?,2,support\n\nThree?,3|three|iii,eval\nFour?,4,train\n"
    )
    yaml_path = write_yaml(tmp_path / "csvtask.yaml", "file: all.csv\nsplit_column: split\nkind: vqa\n")
    task = load_task(yaml_path, cache_dir=hf_cache)
    assert [e.answers for e in task.split("support")] == [("1", "one"), ("2",)]
    assert (
        task.split("eval")[0].answers == ("3", "three", "iii") and task.split("train")[0].question == "Four?"
    )
    (tmp_path / "all.csv").write_text("question,answers,split\nOne?,1,support\n\nTwo?,,support\n")
    with pytest.raises(UserError, match=r"all.csv line 4: field 'answers' is missing"):
        load_task(yaml_path, cache_dir=hf_cache)


def test_user_parquet_split_ratios(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"input": [f"q{i}" for i in range(20)], "answer": [f"a{i}" for i in range(20)]})
    pq.write_table(table, tmp_path / "rows.parquet")
    yaml_path = write_yaml(
        tmp_path / "pq.yaml", "file: rows.parquet\nsplit_ratios: {support: 0.75, eval: 0.25}\n"
    )
    task = load_task(yaml_path, cache_dir=hf_cache)
    support, ev = task.split("support").ids(), task.split("eval").ids()
    assert len(support) == 15 and len(ev) == 5 and not set(support) & set(ev)
    assert load_task(yaml_path, cache_dir=hf_cache).split("eval").ids() == ev
    assert task.split("eval")[0].answers == (task.split("eval")[0].question.replace("q", "a"),)


def test_user_bad_row_names_file_line_and_field(tmp_path, hf_cache):
    lines = ['{"question": "a?", "answer": "x"}', "", '{"question": "b?", "answer": "y"}', '{"answer": "z"}']
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    yaml_path = write_yaml(tmp_path / "bad.yaml", "files: {support: bad.jsonl}\n")
    with pytest.raises(UserError) as err:
        load_task(yaml_path, cache_dir=hf_cache)
    assert (
        str(tmp_path / "bad.jsonl") in str(err.value)
        and "line 4" in str(err.value)
        and "'question'" in str(err.value)
    )
    (tmp_path / "noanswer.jsonl").write_text('{"question": "a?"}\n')
    yaml_path = write_yaml(tmp_path / "noanswer.yaml", "files: {support: noanswer.jsonl}\n")
    with pytest.raises(UserError, match=r"noanswer.jsonl line 1: missing required field 'answers or answer'"):
        load_task(yaml_path, cache_dir=hf_cache)


def test_user_bad_yaml_keys_listed(tmp_path):
    yaml_path = write_yaml(tmp_path / "typo.yaml", "files: {support: a.jsonl}\npromt: x\nmax_tokens: 3\n")
    with pytest.raises(ConfigError) as err:
        load_task(yaml_path)
    assert "'promt'" in str(err.value) and "'max_tokens'" in str(err.value)
    yaml_path = write_yaml(tmp_path / "layout.yaml", "file: a.jsonl\nfiles: {eval: b.jsonl}\n")
    with pytest.raises(ConfigError, match="either `files`"):
        load_task(yaml_path)
