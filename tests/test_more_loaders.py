"""Flickr30k and OCR-VQA (official files and hub), hub sources of several splits, hub answer types.

Every source is made by the test: the official layouts as files under ``tmp_path``, the hub datasets as
in-memory ``datasets.Dataset``s handed out by a stand-in for ``datasets.load_dataset``. Nothing downloads.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import UserError  # noqa: E402
from pipeline.tasks import load_task  # noqa: E402
from pipeline.tasks.hub import check_source  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_data_env")  # conftest.py


def png(path, colour=(200, 10, 10), size=(6, 4)):
    """A tiny PNG at ``path`` (whatever its suffix: the official names end in .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")


def one_line_error(name, **options) -> str:
    """The ``UserError`` of loading the task and reading its support and eval splits; it must be one line."""
    with pytest.raises(UserError) as err:
        task = load_task(name, **options)
        task.split("support")
        task.split("eval")
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset`` answering from ``tables[(id, split)]``; every call is recorded."""
    tables: dict[tuple[str, str], datasets.Dataset] = {}
    calls: list[tuple[str, str]] = []

    def load_dataset(path, name=None, split=None, revision=None, cache_dir=None, **kwargs):
        calls.append((path, split))
        if (path, split) not in tables:
            raise ValueError(f"Unknown split {split!r}. Should be one of {sorted(s for p, s in tables if p == path)}")
        return tables[(path, split)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


# --- Flickr30k ----------------------------------------------------------------------------------


def flickr_entry(imgid, split):
    return {
        "filename": f"{1000 + imgid}.jpg",
        "imgid": imgid,
        "split": split,
        "sentids": [5 * imgid, 5 * imgid + 1],
        "sentences": [
            {"tokens": ["a"], "raw": f" Dog {imgid} runs. ", "imgid": imgid, "sentid": 5 * imgid},
            {"tokens": ["b"], "raw": "A dog.", "imgid": imgid, "sentid": 5 * imgid + 1},
        ],
    }


def write_flickr(root, entries, images=True):
    (root / "flickr30k").mkdir(parents=True, exist_ok=True)
    (root / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    if images:
        for e in entries:
            png(root / "flickr30k" / "flickr30k-images" / e["filename"])


FLICKR = [(0, "train"), (1, "val"), (2, "train"), (3, "test"), (4, "train"), (5, "test")]


def test_flickr30k_official_karpathy_split(tmp_path, hf_cache):
    write_flickr(tmp_path, [flickr_entry(i, s) for i, s in FLICKR])
    task = load_task("flickr30k", data_root=str(tmp_path), train_size=2, cache_dir=hf_cache)
    assert (task.spec.kind, task.spec.metric, task.spec.prompt, task.spec.max_new_tokens) == (
        "caption", "cider", "Caption:", 20)
    support = task.split("support")
    assert support.ids() == ["0", "2", "4"]  # train only, in file order; val never used
    assert task.split("eval").ids() == ["3", "5"]
    train = task.split("train")
    assert len(train) == 2 and set(train.ids()) <= {"0", "2", "4"}
    example = task.split("eval")[1]
    assert (example.id, example.question, example.answers) == ("5", "", ("Dog 5 runs.", "A dog."))
    assert example.image == str(tmp_path / "flickr30k" / "flickr30k-images" / "1005.jpg")
    assert Image.open(example.image).size == (6, 4) and example.meta is None


def test_flickr30k_missing_file_and_image_are_one_line_errors(tmp_path, hf_cache):
    message = one_line_error(name="flickr30k", data_root=str(tmp_path), cache_dir=hf_cache)
    assert str(tmp_path / "flickr30k" / "dataset_flickr30k.json") in message and "--data-root" in message
    write_flickr(tmp_path, [flickr_entry(i, s) for i, s in FLICKR], images=False)
    message = one_line_error(name="flickr30k", data_root=str(tmp_path), cache_dir=hf_cache, train_size=1)
    assert str(tmp_path / "flickr30k" / "flickr30k-images" / "1000.jpg") in message


def test_karpathy_file_without_the_id_field_is_named(tmp_path, hf_cache):
    entries = [flickr_entry(i, s) for i, s in FLICKR]
    for e in entries:
        del e["imgid"]
    write_flickr(tmp_path, entries)
    message = one_line_error(name="flickr30k", data_root=str(tmp_path), cache_dir=hf_cache, train_size=1)
    assert "dataset_flickr30k.json" in message and "'imgid'" in message


FLICKR_HUB = datasets.Features({
    "image": datasets.Image(),
    "caption": datasets.List(datasets.Value("string")),
    "sentids": datasets.List(datasets.Value("string")),
    "split": datasets.Value("string"),
    "img_id": datasets.Value("string"),
    "filename": datasets.Value("string"),
})


def flickr_hub_rows(split, ids, colour):
    return datasets.Dataset.from_list([
        {"image": Image.new("RGB", (3, 3), colour), "caption": [f"cap {i}", "another"],
         "sentids": [str(5 * i), str(5 * i + 1)], "split": split, "img_id": str(i), "filename": f"{1000 + i}.jpg"}
        for i in ids
    ], features=FLICKR_HUB)


def test_flickr30k_hub(hub, tmp_path):
    tables, calls = hub
    tables[("umaru97/flickr30k_train_val_test", "train")] = flickr_hub_rows("train", [0, 2, 4], "blue")
    tables[("umaru97/flickr30k_train_val_test", "test")] = flickr_hub_rows("test", [3, 5], "red")
    task = load_task("flickr30k", source="hub", data_root=str(tmp_path), train_size=3)
    assert task.split("support").ids() == ["0", "2", "4"] and sorted(task.split("train").ids()) == ["0", "2", "4"]
    example = task.split("eval")[0]
    assert (example.id, example.question, example.answers) == ("3", "", ("cap 3", "another"))
    assert example.image.getpixel((1, 1)) == (255, 0, 0)
    assert calls == [("umaru97/flickr30k_train_val_test", "train"), ("umaru97/flickr30k_train_val_test", "test")]


# --- OCR-VQA ------------------------------------------------------------------------------------


def ocr_entry(split, questions, answers, title="A Book"):
    return {"imageURL": "http://ecx.images-amazon.com/images/I/51x.jpg", "questions": questions,
            "answers": answers, "title": title, "authorName": "Someone", "genre": "Travel", "split": split}


OCR_DATA = {
    "0001055178": ocr_entry(1, ["Who wrote this book?", "What is the title of this book?"],
                            ["Someone", "A Book"]),
    "0002007770": ocr_entry(2, ["Is this a travel book?", "What is the genre of this book?"], ["Yes", "Travel"]),
    "0004724538": ocr_entry(1, ["Is this a comedy book?"], ["No"]),
    "0005000000": ocr_entry(3, ["Who is the author?"], ["Nobody"]),
}


def write_ocr(root, data, images=True):
    (root / "ocr_vqa").mkdir(parents=True, exist_ok=True)
    (root / "ocr_vqa" / "dataset.json").write_text(json.dumps(data))
    if images:
        for i, image_id in enumerate(data):
            png(root / "ocr_vqa" / "images" / f"{image_id}.jpg", colour=(10 * i, 0, 0))


def test_ocr_vqa_official_one_example_per_question(tmp_path, hf_cache):
    write_ocr(tmp_path, OCR_DATA)
    task = load_task("ocr_vqa", data_root=str(tmp_path), train_size=2, cache_dir=hf_cache)
    assert (task.spec.kind, task.spec.metric) == ("vqa", "exact_match")
    support = task.split("support")
    # split 1 only, image by image, question by question; ids: image id + two-digit question index
    assert support.ids() == ["000105517800", "000105517801", "000472453800"]
    assert [(e.question, e.answers) for e in support] == [
        ("Who wrote this book?", ("Someone",)),
        ("What is the title of this book?", ("A Book",)),
        ("Is this a comedy book?", ("No",)),
    ]
    assert support[2].image == str(tmp_path / "ocr_vqa" / "images" / "0004724538.jpg")
    assert Image.open(support[2].image).getpixel((0, 0)) == (20, 0, 0)
    assert len(task.split("train")) == 2 and set(task.split("train").ids()) <= set(support.ids())
    ev = task.split("eval")  # split 2 (val), as the MimIC code's query set; split 3 (test) is not read
    assert ev.ids() == ["000200777000", "000200777001"] and ev[1].answers == ("Travel",)
    # exact match after lower-casing and trimming: "travel" == "Travel", "no" != "Yes"
    assert task.score(["travel ", "no"], [ev[1].answers, ev[0].answers])["per_sample"] == [100.0, 0.0]


def test_ocr_vqa_bad_files_are_one_line_errors(tmp_path, hf_cache):
    dataset = tmp_path / "ocr_vqa" / "dataset.json"
    message = one_line_error(name="ocr_vqa", data_root=str(tmp_path), cache_dir=hf_cache)
    assert str(dataset) in message and "--data-root" in message
    write_ocr(tmp_path, {**OCR_DATA, "0009": ocr_entry(1, ["Q1?", "Q2?"], ["only one"])})
    message = one_line_error(name="ocr_vqa", data_root=str(tmp_path), cache_dir=hf_cache, train_size=1)
    assert str(dataset) in message and "0009" in message and "2 questions and 1 answers" in message
    dataset.write_text('{"0001": {"questions": ["Q?"],\n "answers": ["A"] "split": 1}}')
    message = one_line_error(name="ocr_vqa", data_root=str(tmp_path), cache_dir=hf_cache, train_size=1)
    assert str(dataset) in message and "line 2" in message
    write_ocr(tmp_path, OCR_DATA)
    (tmp_path / "ocr_vqa" / "images" / "0001055178.jpg").unlink()
    message = one_line_error(name="ocr_vqa", data_root=str(tmp_path), cache_dir=hf_cache, train_size=1)
    assert str(tmp_path / "ocr_vqa" / "images" / "0001055178.jpg") in message


OCR_HUB = datasets.Features({
    "image": datasets.Image(),
    "image_id": datasets.Value("string"),
    "questions": datasets.List(datasets.Value("string")),
    "answers": datasets.List(datasets.Value("string")),
    "title": datasets.Value("string"),
    "genre": datasets.Value("string"),
    "set_name": datasets.Value("string"),
})


def ocr_hub_rows(set_name, data):
    return datasets.Dataset.from_list([
        {"image": Image.new("RGB", (4, 4), (i * 50, 0, 0)), "image_id": image_id, "questions": info["questions"],
         "answers": info["answers"], "title": info["title"], "genre": info["genre"], "set_name": set_name}
        for i, (image_id, info) in enumerate(data.items())
    ], features=OCR_HUB)


def test_ocr_vqa_hub_one_example_per_question(hub, tmp_path):
    tables, calls = hub
    train = {k: v for k, v in OCR_DATA.items() if v["split"] == 1}
    val = {k: v for k, v in OCR_DATA.items() if v["split"] == 2}
    tables[("howard-hou/OCR-VQA", "train")] = ocr_hub_rows("train", train)
    tables[("howard-hou/OCR-VQA", "validation")] = ocr_hub_rows("val", val)
    task = load_task("ocr_vqa", source="hub", data_root=str(tmp_path), train_size=3)
    support = task.split("support")
    assert support.ids() == ["000105517800", "000105517801", "000472453800"]  # the official loader's ids
    assert [(e.question, e.answers) for e in support] == [
        ("Who wrote this book?", ("Someone",)),
        ("What is the title of this book?", ("A Book",)),
        ("Is this a comedy book?", ("No",)),
    ]
    assert support[2].image.getpixel((0, 0)) == (50, 0, 0) and support[0].image.getpixel((0, 0)) == (0, 0, 0)
    assert [e.id for e in support[1:]] == ["000105517801", "000472453800"]  # a slice of the view
    ev = task.split("eval")
    assert [(e.id, e.answers) for e in ev] == [("000200777000", ("Yes",)), ("000200777001", ("Travel",))]
    assert calls == [("howard-hou/OCR-VQA", "train"), ("howard-hou/OCR-VQA", "validation")]

    bad = {"0009": ocr_entry(1, ["Q1?", "Q2?"], ["only one"])}
    tables[("howard-hou/OCR-VQA", "train")] = ocr_hub_rows("train", bad)
    message = one_line_error(name="ocr_vqa", source="hub", data_root=str(tmp_path), train_size=1)
    assert "howard-hou/OCR-VQA" in message and "0009" in message and "2 questions and 1 answers" in message


# --- hub: several splits, answer types ----------------------------------------------------------

COCO_HUB = datasets.Features({
    "filepath": datasets.Value("string"),
    "sentids": datasets.List(datasets.Value("int64")),
    "filename": datasets.Value("string"),
    "imgid": datasets.Value("int64"),
    "split": datasets.Value("string"),
    "sentences": datasets.List(datasets.Value("string")),
    "cocoid": datasets.Value("int64"),
    "url": datasets.Value("string"),
})


def coco_hub_rows(root, split, cocoids):
    folder = "train2014" if split == "train" else "val2014"
    rows = []
    for c in cocoids:
        filename = f"COCO_{folder}_{c:012d}.jpg"
        png(root / "coco" / folder / filename)
        rows.append({"filepath": folder, "sentids": [c], "filename": filename, "imgid": c, "split": split,
                     "sentences": [f"caption {c}"], "cocoid": c, "url": f"http://images.cocodataset.org/{filename}"})
    return datasets.Dataset.from_list(rows, features=COCO_HUB)


def test_coco_hub_support_is_train_then_restval(hub, tmp_path):
    tables, calls = hub
    tables[("yerevann/coco-karpathy", "train")] = coco_hub_rows(tmp_path, "train", [9, 25, 30])
    tables[("yerevann/coco-karpathy", "restval")] = coco_hub_rows(tmp_path, "restval", [42, 73])
    tables[("yerevann/coco-karpathy", "test")] = coco_hub_rows(tmp_path, "test", [391895])
    task = load_task("coco_caption", source="hub", data_root=str(tmp_path), train_size=5)
    support = task.split("support")
    assert support.ids() == ["9", "25", "30", "42", "73"]  # train, then restval, each in its order
    assert support[3].answers == ("caption 42",)
    assert support[3].image == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg")
    assert sorted(task.split("train").ids(), key=int) == ["9", "25", "30", "42", "73"]
    assert task.split("eval").ids() == ["391895"]
    assert calls == [("yerevann/coco-karpathy", s) for s in ("train", "restval", "test")]


def test_hub_split_list_errors_name_the_split(hub, tmp_path):
    tables, _ = hub
    tables[("yerevann/coco-karpathy", "train")] = coco_hub_rows(tmp_path, "train", [9])
    message = one_line_error(name="coco_caption", source="hub", data_root=str(tmp_path), train_size=1)
    assert "yerevann/coco-karpathy" in message and "split 'restval'" in message
    tables[("yerevann/coco-karpathy", "restval")] = datasets.Dataset.from_list([{"cocoid": 1, "other": "x"}])
    message = one_line_error(name="coco_caption", source="hub", data_root=str(tmp_path), train_size=1)
    assert "['train', 'restval']" in message and "cannot be concatenated" in message


VQA_HUB = datasets.Features({
    "question_type": datasets.Value("string"),
    "multiple_choice_answer": datasets.Value("string"),
    "answers": datasets.List({"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                              "answer_id": datasets.Value("int64")}),
    "image_id": datasets.Value("int64"),
    "answer_type": datasets.Value("string"),
    "question_id": datasets.Value("int64"),
    "question": datasets.Value("string"),
    "image": datasets.Image(),
})


def vqa_hub_rows(rows, image=True):
    features = VQA_HUB if image else datasets.Features({k: v for k, v in VQA_HUB.items() if k != "image"})
    return datasets.Dataset.from_list([
        {"question_type": "what", "multiple_choice_answer": a, "image_id": 100 + qid, "answer_type": t,
         "question_id": qid, "question": q,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j} for j in range(10)],
         **({"image": Image.new("RGB", (2, 2), "green")} if image else {})}
        for qid, q, a, t in rows
    ], features=features)


def test_vqav2_hub_answer_type_in_meta(hub, tmp_path):
    tables, _ = hub
    tables[("pminervini/VQAv2", "train")] = vqa_hub_rows([(1, "Is it?", "yes", "yes/no")], image=False)
    png(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000101.jpg")
    tables[("lmms-lab/VQAv2", "validation")] = vqa_hub_rows(
        [(7, "How many?", "2", "number"), (8, "Is it red?", "no", "yes/no"), (9, "What?", "cat", "other")])
    task = load_task("vqav2", source="hub", data_root=str(tmp_path), train_size=1)
    ev = task.split("eval")
    assert [(e.id, e.answers[0], e.meta) for e in ev] == [
        ("7", "2", {"answer_type": "number"}),
        ("8", "no", {"answer_type": "yes/no"}),
        ("9", "cat", {"answer_type": "other"}),
    ]
    assert task.split("support")[0].meta is None  # the support block maps no meta (it is not reported by type)


def test_okvqa_hub_answer_type_in_meta(hub, tmp_path):
    tables, _ = hub
    features = datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")), "question_type": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
    })
    row = {"question_id": "2971475", "image": Image.new("RGB", (2, 2), "blue"), "question": "What sport?",
           "answers": ["race"] * 4 + ["bike"] * 6, "question_type": "sports", "answer_type": "other"}
    tables[("Multimodal-Fatima/OK-VQA_train", "train")] = datasets.Dataset.from_list(
        [{k: v for k, v in row.items() if k not in ("question_type", "answer_type")}],
        features=datasets.Features({k: v for k, v in features.items() if k not in ("question_type", "answer_type")}))
    tables[("lmms-lab/OK-VQA", "val2014")] = datasets.Dataset.from_list([row], features=features)
    task = load_task("okvqa", source="hub", data_root=str(tmp_path), train_size=1)
    example = task.split("eval")[0]
    assert (example.id, example.answers.count("bike"), example.meta) == ("2971475", 6, {"answer_type": "other"})
    assert task.split("support")[0].meta is None

    tables[("lmms-lab/OK-VQA", "val2014")] = tables[("lmms-lab/OK-VQA", "val2014")].remove_columns("answer_type")
    message = one_line_error(name="okvqa", source="hub", data_root=str(tmp_path), train_size=1)
    assert "lmms-lab/OK-VQA" in message and "['answer_type']" in message and "hub.*.meta" in message


def test_check_source_new_keys():
    base = {"id": "x/y", "columns": {"id": "i", "answers": "a"}}
    assert check_source("t", "support", {**base, "split": ["train", "restval"]}) == []
    assert check_source("t", "support", {**base, "split": []}) == [
        "hub.support.split: got [], expected a split name or a list of split names"]
    assert check_source("t", "eval", {**base, "split": "v", "meta": {"answer_type": 3}}) == [
        "hub.eval.meta must map Example.meta keys to column names, got {'answer_type': 3}"]
    assert check_source("t", "eval", {**base, "split": "v", "one_per_question": True}) == [
        "hub.eval: one_per_question needs columns.question (a list per row)"]
    assert check_source("t", "eval", {**base, "split": "v", "one_per_question": "yes"}) == [
        "hub.eval.one_per_question: got 'yes', expected true or false"]


def test_karpathy_file_without_the_asked_split_is_one_line(tmp_path, hf_cache):
    """A Karpathy file with no test image would evaluate nothing; one with no train image would have no
    demonstrations: each is refused when that split is read, naming the splits the file has."""
    write_flickr(tmp_path, [flickr_entry(i, s) for i, s in [(0, "train"), (1, "val"), (2, "train")]])
    task = load_task("flickr30k", data_root=str(tmp_path), train_size=1, cache_dir=hf_cache)
    assert task.split("support").ids() == ["0", "2"]
    with pytest.raises(UserError, match=r"no image in split\(s\) \['test'\] \(it has \['train', 'val'\]\)") as caught:
        task.split("eval")
    assert "dataset_flickr30k.json" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "wanted"),
    [
        (ocr_entry("1", ["Q?"], ["A"]), "image 0009 has split '1'; expected 1 (train), 2 (val) or 3 (test)"),
        (ocr_entry([1], ["Q?"], ["A"]), "image 0009 has split [1]; expected 1 (train)"),
        (ocr_entry(4, ["Q?"], ["A"]), "image 0009 has split 4; expected 1 (train)"),
        (ocr_entry(1, ["Q?"], [None]), "image 0009 has a null in its answers"),
        (ocr_entry(1, [None], ["A"]), "image 0009 has a null in its questions"),
    ],
)
def test_ocr_vqa_split_codes_and_nulls_are_one_line(tmp_path, hf_cache, entry, wanted):
    """A split code of another type would drop the image silently; a null would become the text "None"."""
    write_ocr(tmp_path, {**OCR_DATA, "0009": entry})
    message = one_line_error(name="ocr_vqa", data_root=str(tmp_path), cache_dir=hf_cache, train_size=1)
    assert str(tmp_path / "ocr_vqa" / "dataset.json") in message and wanted in message, message


@pytest.mark.parametrize(
    ("captions", "shown"),
    [([None, "a dog"], "[None, 'a dog']"), ([], "[]"), (None, "None")],
)
def test_hub_captions_missing_or_null_are_one_line(hub, tmp_path, captions, shown):
    """A null caption became the reference "None"; no caption at all was a ValueError when the example was
    shown as a demonstration."""
    tables, _ = hub
    rows = flickr_hub_rows("train", [0, 2], "blue").to_list()
    rows[1]["caption"] = captions
    tables[("umaru97/flickr30k_train_val_test", "train")] = datasets.Dataset.from_list(rows, features=FLICKR_HUB)
    tables[("umaru97/flickr30k_train_val_test", "test")] = flickr_hub_rows("test", [3], "red")
    message = one_line_error(name="flickr30k", source="hub", data_root=str(tmp_path), train_size=1)
    assert "umaru97/flickr30k_train_val_test (train) id 2: column 'caption' holds no answer or a null one" in message
    assert message.endswith(f"({shown})")


@pytest.mark.parametrize(
    ("questions", "answers", "wanted"),
    [
        (["Q1?", "Q2?"], ["A", None], "row 0 (id 0009) holds a null question or answer"),
        ([None], ["A"], "row 0 (id 0009) holds a null question or answer"),
        ([], [], "holds no question in column 'questions'"),
    ],
)
def test_ocr_vqa_hub_null_or_no_question_is_one_line(hub, tmp_path, questions, answers, wanted):
    tables, _ = hub
    tables[("howard-hou/OCR-VQA", "train")] = ocr_hub_rows("train", {"0009": ocr_entry(1, questions, answers)})
    tables[("howard-hou/OCR-VQA", "validation")] = ocr_hub_rows("val", {"0002": ocr_entry(2, ["Q?"], ["A"])})
    message = one_line_error(name="ocr_vqa", source="hub", data_root=str(tmp_path), train_size=1)
    assert "howard-hou/OCR-VQA (train)" in message and wanted in message, message
