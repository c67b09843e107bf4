"""MME and SEED-Bench (image part) as built-in tasks, and `pipeline evaluate --metrics chair`.

The loaders read files in the official layouts written here and in-memory ``datasets.Dataset``s with
the hub schemas (``datasets.load_dataset`` is replaced; nothing downloads). Breakdowns and CHAIR are
checked against values worked out by hand in the comments.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
from conftest import tiny
from PIL import Image

from pipeline.config import ConfigError, UserError
from pipeline.runtime import wrap_model
from pipeline.tasks import Example, load_task
from pipeline.tasks.benchmarks import SEED_IMAGE_TYPES, benchmark_breakdown
from pipeline.tasks.sampling import sample_demonstrations
from stages import evaluate


def picture(path: Path, colour=(200, 10, 10), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --- MME -----------------------------------------------------------------------------------------
# subtask -> (layout, image stems); each image gets a "Yes" and a "No" question
MME_LAYOUT = {
    "existence": ("flat", ["0001", "0002", "0003", "0004"]),
    "artwork": ("split", ["10002", "10003", "10004"]),
    "code_reasoning": ("flat", ["0020", "0021"]),
}


def mme_questions(subtask: str, stem: str) -> list[tuple[str, str]]:
    return [(f"Is {subtask} {stem} yes? Please answer yes or no.", "Yes"),
            (f"Is {subtask} {stem} no? Please answer yes or no.", "No")]


def write_mme(root: Path, nested: bool = False) -> Path:
    """The MME_Benchmark_release_version folder under ``root`` (its subtasks under MME_Benchmark/ if nested)."""
    base = root / "MME_Benchmark_release_version"
    if nested:
        base = base / "MME_Benchmark"
    for subtask, (layout, stems) in MME_LAYOUT.items():
        folder = base / subtask
        suffix = ".png" if subtask == "code_reasoning" else ".jpg"
        for k, stem in enumerate(stems):
            image_dir, text_dir = (folder / "images", folder / "questions_answers_YN") if layout == "split" else (
                folder, folder)
            picture(image_dir / f"{stem}{suffix}", colour=(10 * k, 100, 200))
            text_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(f"{q}\t{a}\n" for q, a in mme_questions(subtask, stem))
            (text_dir / f"{stem}.txt").write_text(lines, encoding="utf-8")
    return root


def all_mme() -> dict[str, tuple[str, str, str]]:
    """example id -> (subtask, question, answer) of everything write_mme writes."""
    out = {}
    for subtask, (_, stems) in MME_LAYOUT.items():
        suffix = ".png" if subtask == "code_reasoning" else ".jpg"
        for stem in stems:
            for n, (q, a) in enumerate(mme_questions(subtask, stem), 1):
                out[f"{subtask}/{stem}{suffix}#{n}"] = (subtask, q, a)
    return out


def images_of(examples) -> set[str]:
    return {e.meta["image"] for e in examples}


@pytest.mark.parametrize("nested", [False, True])
def test_mme_official_layout(tmp_path, nested):
    write_mme(tmp_path, nested)
    task = load_task("mme", data_root=str(tmp_path), split_ratios={"support": 0.5, "eval": 0.5})
    support, train, evaluation = (list(task.split(s)) for s in ("support", "train", "eval"))
    expected = all_mme()
    seen = {e.id: e for e in support + evaluation}
    assert len(seen) == len(support) + len(evaluation) == len(expected)  # every question once, in one part
    for example_id, (subtask, question, answer) in expected.items():
        e = seen[example_id]
        assert (e.question, e.answers) == (question, (answer,))
        assert e.meta == {"subtask": subtask, "image": example_id.split("#")[0]}
        assert Path(e.image).is_file() and Path(e.image).name == example_id.split("#")[0].split("/")[1]
    # images, not questions, are divided: round(0.5 * n) images of each subtask support (4 -> 2, 3 -> 2, 2 -> 1)
    per_subtask = {s: len({e.meta["image"] for e in support if e.meta["subtask"] == s}) for s in MME_LAYOUT}
    assert per_subtask == {"existence": 2, "artwork": 2, "code_reasoning": 1}
    assert not images_of(support) & images_of(evaluation)
    for part in (support, evaluation):  # the two questions of an image are adjacent, in file order
        assert [e.id.split("#")[1] for e in part] == ["1", "2"] * (len(part) // 2)
        assert [e.meta["image"] for e in part[::2]] == [e.meta["image"] for e in part[1::2]]
    assert [e.id for e in train] == [e.id for e in support]  # no train part: training queries are the support
    again = load_task("mme", data_root=str(tmp_path), split_ratios={"support": 0.5, "eval": 0.5})
    assert [e.id for e in again.split("eval")] == [e.id for e in evaluation]  # seeded: the same partition


def test_mme_defaults_prompt_and_parsing(tmp_path):
    write_mme(tmp_path)
    task = load_task("mme", data_root=str(tmp_path))
    assert task.spec.kind == "vqa" and task.spec.metric == "mme_accuracy"
    support = list(task.split("support"))
    # default 10% of each subtask's images, at least one: one image (two questions) per subtask
    assert sorted(e.meta["subtask"] for e in support) == sorted(list(MME_LAYOUT) * 2)
    # the official parse of the stripped response: "yes"/"no" in its first 4 characters, yes first
    for generated, prediction in ((" Yes, there is.", "yes"), ("no", "no"), (" NO\nYes", "no"),
                                  ("Not sure", "no"), ("Maybe", "Maybe"), ("  yes", "yes")):
        assert task.postprocess(generated) == prediction
    scored = task.score(["yes", "no", "Maybe", "Yes"], [["Yes"], ["Yes"], ["No"], ["yes"]])
    assert scored["per_sample"] == [100.0, 0.0, 0.0, 100.0] and scored["score"] == 50.0
    assert task.demo_answer(support[0]) in ("Yes", "No")


def test_mme_bad_files_are_one_line_errors(tmp_path):
    write_mme(tmp_path)
    bad = tmp_path / "MME_Benchmark_release_version" / "existence" / "0001.txt"
    bad.write_text("Is it? Please answer yes or no.\tMaybe\n")
    with pytest.raises(UserError, match=r"0001\.txt line 1.*'Maybe'.*Yes or No"):
        load_task("mme", data_root=str(tmp_path)).split("eval")
    with pytest.raises(UserError, match="MME folder .* not found"):
        load_task("mme", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="split_ratios"):
        load_task("mme", data_root=str(tmp_path), split_ratios={"support": 0.8, "eval": 0.5})
    with pytest.raises(ConfigError, match="eval is missing"):
        load_task("mme", data_root=str(tmp_path), split_ratios={"support": 0.5})


def test_mme_lines_naming_their_image(tmp_path):
    """A subtask file of ``image<TAB>question<TAB>answer`` lines (the eval tool's layout) beside the images."""
    folder = tmp_path / "MME_Benchmark_release_version" / "position"
    for stem in ("p1", "p2"):
        picture(folder / f"{stem}.jpg")
    lines = [f"{stem}.jpg\t{q}\t{a}" for stem in ("p1", "p2") for q, a in mme_questions("position", stem)]
    (folder / "position.txt").write_text("\n".join(lines) + "\n")
    task = load_task("mme", data_root=str(tmp_path), split_ratios={"support": 0.5, "eval": 0.5})
    examples = list(task.split("support")) + list(task.split("eval"))
    assert sorted((e.id, e.question, e.answers[0]) for e in examples) == sorted(
        (f"position/{stem}.jpg#{n}", q, a) for stem in ("p1", "p2")
        for n, (q, a) in enumerate(mme_questions("position", stem), 1))
    (folder / "position.txt").write_text("p3.jpg\tIs it? Please answer yes or no.\tYes\n")
    with pytest.raises(UserError, match=r"position\.txt line 1 names image 'p3\.jpg', not found"):
        load_task("mme", data_root=str(tmp_path)).split("eval")


def test_mme_file_not_utf8_is_one_line(tmp_path):
    write_mme(tmp_path)
    bad = tmp_path / "MME_Benchmark_release_version" / "existence" / "0002.txt"
    bad.write_bytes(b"Is it? Please answer yes or no.\tYes\nIs \xff it?\tNo\n")
    with pytest.raises(UserError, match=r"0002\.txt line 2: not UTF-8 text") as caught:
        load_task("mme", data_root=str(tmp_path)).split("eval")
    assert "\n" not in str(caught.value)


def hub_mme(n_images: int = 6) -> datasets.Dataset:
    """lmms-lab/MME's schema: question_id (the image), image, question, answer, category."""
    rows = []
    for k in range(n_images):
        subtask = ("count", "OCR", "text_translation")[k % 3]
        for q, a in mme_questions(subtask, str(k)):
            rows.append({"question_id": f"{subtask}/{k:04d}.png", "image": Image.new("RGB", (8, 8), (k, 0, 0)),
                         "question": q, "answer": a, "category": subtask})
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "category": datasets.Value("string")})
    return datasets.Dataset.from_list(rows, features=features)


def fake_hub(monkeypatch, dataset: datasets.Dataset, expected_id: str) -> list:
    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, split))
        assert path == expected_id
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_mme_hub(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, hub_mme(), "lmms-lab/MME")
    task = load_task("mme", source="hub", split_ratios={"support": 0.34, "eval": 0.66})
    assert calls == []  # nothing is read before a split is asked for
    support, evaluation = list(task.split("support")), list(task.split("eval"))
    assert calls == [("lmms-lab/MME", "test")]  # read once for every split
    task.split("train")
    assert len(calls) == 1
    # 2 images per subtask: round(0.34 * 2) = 1 support image each (at least one), the other evaluated
    assert len(support) == len(evaluation) == 6 and not images_of(support) & images_of(evaluation)
    first = evaluation[0]
    assert first.id == f"{first.meta['image']}#1" and isinstance(first.image, Image.Image)
    assert first.answers == ("Yes",) and first.meta["subtask"] in ("count", "OCR", "text_translation")


# --- SEED-Bench ----------------------------------------------------------------------------------
def seed_rows() -> list[dict]:
    """Image questions of types 1, 5 and 9 (two questions share an image), plus a video question."""
    rows = []
    for k, (kind, image) in enumerate([(1, "a.jpg"), (1, "b.jpg"), (1, "c.jpg"), (5, "d.jpg"), (5, "d.jpg"),
                                       (5, "e.jpg"), (9, "f.jpg"), (9, "g.jpg")]):
        rows.append({"answer": "ABCD"[k % 4], "choice_a": f"a{k}", "choice_b": f"b{k}", "choice_c": f"c{k}",
                     "choice_d": f"d{k}", "data_id": image, "data_type": "image", "question": f"What is {k}?",
                     "question_id": str(100 + k), "question_type_id": kind})
    rows.append({"answer": "A", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
                 "data_id": "v.mp4", "data_type": "video", "question": "What happens?", "question_id": "900",
                 "question_type_id": 10})
    return rows


def test_seed_official_layout(tmp_path):
    rows = seed_rows()
    folder = tmp_path / "seed_bench"
    folder.mkdir()
    (folder / "SEED-Bench.json").write_text(json.dumps({"questions": rows, "question_type": {
        name: k for k, name in SEED_IMAGE_TYPES.items()}}))
    for r in rows[:-1]:
        picture(folder / "SEED-Bench-image" / r["data_id"])
    task = load_task("seed_bench", data_root=str(tmp_path), split_ratios={"support": 0.5, "eval": 0.5},
                     train_size=2, cache_dir=str(tmp_path / "hf"))
    assert task.spec.metric == "seed_accuracy"
    support, evaluation = list(task.split("support")), list(task.split("eval"))
    ids = {e.id for e in support + evaluation}
    assert ids == {str(100 + k) for k in range(8)}  # the video question is left out
    assert len(support) + len(evaluation) == 8 and not images_of(support) & images_of(evaluation)
    assert [e.id for e in task.split("train")] == [e.id for e in support][:2]
    e = next(x for x in support + evaluation if x.id == "103")
    assert e.question == "What is 3?\nA. a3\nB. b3\nC. c3\nD. d3" and e.answers == ("D",)
    assert e.meta == {"question_type": "Instances Counting", "question_type_id": 5, "image": "d.jpg"}
    assert e.image == str(folder / "SEED-Bench-image" / "d.jpg")
    mates = [x for x in support + evaluation if x.meta["image"] == "d.jpg"]
    assert len(mates) == 2 and len({x.id in {s.id for s in support} for x in mates}) == 1  # one part
    prompt = task.spec.query_text(e)
    assert prompt.startswith("Question:What is 3?\nA. a3") and prompt.endswith("directly. Answer:")
    for generated, prediction in ((" B", "B"), ("(C) a dog", "C"), ("The answer is D.", "D"),
                                  ("A cat on a mat", "A cat on a mat"), ("Either B or C", "Either B or C")):
        assert task.postprocess(generated) == prediction


def test_seed_hub_keeps_image_questions(monkeypatch):
    rows = seed_rows()
    for k, r in enumerate(rows):
        r["image"] = [Image.new("RGB", (8, 8), (k, 0, 0))] * (1 if r["data_type"] == "image" else 3)
    features = datasets.Features({**{k: datasets.Value("string") for k in rows[0] if k not in ("image",
                                                                                             "question_type_id")},
                                  "question_type_id": datasets.Value("int64"),
                                  "image": datasets.Sequence(datasets.Image())})
    fake_hub(monkeypatch, datasets.Dataset.from_list(rows, features=features), "lmms-lab/SEED-Bench")
    task = load_task("seed_bench", source="hub", split_ratios={"support": 0.5, "eval": 0.5}, train_size=1)
    examples = list(task.split("support")) + list(task.split("eval"))
    assert sorted(e.id for e in examples) == [str(100 + k) for k in range(8)]
    assert all(isinstance(e.image, Image.Image) for e in examples)
    assert {e.meta["question_type"] for e in examples} == {"Scene Understanding", "Instances Counting",
                                                          "Text Understanding"}


def _with_row(k: int, **changes) -> list[dict]:
    rows = seed_rows()
    for key, value in changes.items():
        if value is KeyError:
            del rows[k][key]
        else:
            rows[k][key] = value
    return rows


@pytest.mark.parametrize(
    ("rows", "wanted"),
    [  # a missing option would be shown as "D. None" or "D. " in the prompt; a null type was a TypeError
        (_with_row(0, choice_d=KeyError), "question 100 has no choice_d; a SEED-Bench question has four options"),
        (_with_row(3, choice_d=None), "question 103 has no choice_d"),
        (_with_row(1, choice_c="  "), "question 101 has no choice_c"),
        (_with_row(2, question_type_id=None), "question 102 has question_type_id None; expected an integer"),
        (_with_row(0, answer="E"), "question 100 has answer 'E'; expected A, B, C or D"),
    ],
)
def test_seed_rows_that_cannot_be_asked_are_one_line(tmp_path, rows, wanted):
    folder = tmp_path / "seed_bench"
    folder.mkdir()
    (folder / "SEED-Bench.json").write_text(json.dumps({"questions": rows}))
    for r in rows[:-1]:
        picture(folder / "SEED-Bench-image" / r["data_id"])
    task = load_task("seed_bench", data_root=str(tmp_path), split_ratios={"support": 0.5, "eval": 0.5},
                     cache_dir=str(tmp_path / "hf"))
    with pytest.raises(UserError) as caught:
        task.split("eval")
    assert wanted in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


# --- the single-split demonstration policy -------------------------------------------------------
def test_no_evaluated_image_is_a_demonstration_or_training_query(tmp_path):
    write_mme(tmp_path)
    task = load_task("mme", data_root=str(tmp_path),
                     split_ratios={"support": 0.4, "train": 0.3, "eval": 0.3})
    support, train, evaluation = (list(task.split(s)) for s in ("support", "train", "eval"))
    assert support and train and evaluation
    held_out = images_of(evaluation)
    assert not held_out & images_of(support) and not held_out & images_of(train)
    assert not images_of(support) & images_of(train)
    assert not {e.question for e in evaluation} & {e.question for e in support + train}
    for query in evaluation:  # the sampler evaluate and teacher-cache use, over the whole support pool
        demos = [support[i] for i in sample_demonstrations(support, query, len(support) - 1, seed=3407)]
        assert not images_of(demos) & held_out


# --- what evaluate reports -------------------------------------------------------------------------
def mme_example(subtask: str, image: str, n: int, answer: str) -> Example:
    return Example(f"{image}#{n}", "q", (answer,), meta={"subtask": subtask, "image": image})


def test_mme_breakdown_by_hand():
    cases = [  # (subtask, image, question, answer, prediction)
        ("existence", "e1", 1, "Yes", "yes"), ("existence", "e1", 2, "No", "no"),  # both right
        ("existence", "e2", 1, "Yes", "no"), ("existence", "e2", 2, "No", "no"),  # one right
        ("count", "c1", 1, "Yes", "no"), ("count", "c1", 2, "No", "yes"),  # none right
        ("code_reasoning", "k1", 1, "Yes", "yes"), ("code_reasoning", "k1", 2, "No", "no"),
        ("color", "x1", 1, "Yes", "yes"),  # its pair was not evaluated: left out of MME's scores
    ]
    examples = [mme_example(s, i, n, a) for s, i, n, a, _ in cases]
    records = [{"prediction": p, "answers": [a]} for *_, a, p in cases]
    out = benchmark_breakdown(examples, records)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; count: 0 + 0; code_reasoning: 100 + 100 = 200
    # perception = existence + count = 125; cognition = code_reasoning = 200; total 325
    assert out["by_subtask"] == {
        "existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4},
        "count": {"acc": 0.0, "acc_plus": 0.0, "score": 0.0, "n": 2},
        "code_reasoning": {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "n": 2},
    }
    assert out["mme"] == {"perception": 125.0, "cognition": 200.0, "total": 325.0, "images": 4, "left_out": 1}
    table = evaluate.mme_table([{"mode": "zero-shot", "name": "zero-shot", **out}])
    assert "| zero-shot | 125.00 | 200.00 | 325.00 | 4 | 1 |" in table
    assert "| mode | existence | count | code_reasoning |" in table
    assert "| zero-shot | 75.0 / 50.0 | 0.0 / 0.0 | 100.0 / 100.0 |" in table


def test_seed_breakdown_by_hand():
    cases = [  # (type id, answer, generation's prediction)
        (1, "B", "B"), (1, "C", "(C) a dog"), (1, "A", "A cat on a mat"),  # the last: the article, wrong
        (5, "D", "The answer is D"), (9, "A", "B"), (9, "C", "C"),
    ]
    examples = [Example(str(k), "q", (a,), meta={"question_type": SEED_IMAGE_TYPES[t], "question_type_id": t,
                                                 "image": f"{k}.jpg"}) for k, (t, a, _) in enumerate(cases)]
    records = [{"prediction": p, "answers": [a]} for _, a, p in cases]
    out = benchmark_breakdown(examples, records)
    # Scene Understanding 2/3, Instances Counting 1/1, Text Understanding 1/2; overall 4/6
    assert out == {"by_question_type": pytest.approx({
        "overall": 400 / 6, "Scene Understanding": 200 / 3, "Instances Counting": 100.0, "Text Understanding": 50.0})}
    assert list(out["by_question_type"]) == ["overall", "Scene Understanding", "Instances Counting",
                                             "Text Understanding"]
    table = evaluate.question_type_table([{"mode": "icl", "shots": 2, "name": "icl-2shot", **out}])
    assert table[3] == "| mode | overall | Scene Understanding | Instances Counting | Text Understanding |"
    assert table[5] == "| 2-shot ICL | 66.67 | 66.67 | 100.00 | 50.00 |"
    assert benchmark_breakdown([Example("1", "q", ("a",))], [{"prediction": "a", "answers": ["a"]}]) == {}


# --- CHAIR in `pipeline evaluate` -------------------------------------------------------------------
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "car"},
              {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
INSTANCES = {4: [18], 5: [1, 3], 6: []}  # image -> annotated categories
REFERENCES = {4: ["A dog on the grass."], 5: ["A man next to a car and a bike."], 6: ["An empty room."]}


def write_coco(root: Path) -> Path:
    """A Karpathy split (3 test images from val2014, 2 train) and the COCO annotations of the test images."""
    images = []
    for cocoid, split, folder in ((1, "train", "train2014"), (2, "train", "train2014"), (4, "test", "val2014"),
                                  (5, "test", "val2014"), (6, "test", "val2014")):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        picture(root / "coco" / folder / name, colour=(40 * cocoid, 90, 160), size=(32, 32))
        refs = REFERENCES.get(cocoid, ["A photo."])
        images.append({"filepath": folder, "filename": name, "imgid": cocoid, "split": split, "cocoid": cocoid,
                       "sentences": [{"raw": r, "tokens": [], "imgid": cocoid, "sentid": 0} for r in refs]})
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    ann = root / "coco" / "annotations"
    ann.mkdir(parents=True)
    pairs = [(i, c) for i, cats in INSTANCES.items() for c in cats]
    instances = [{"id": 100 + k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(pairs)]
    (ann / "instances_val2014.json").write_text(json.dumps({
        "images": [{"id": i} for i in INSTANCES], "categories": CATEGORIES, "annotations": instances}))
    (ann / "captions_val2014.json").write_text(json.dumps({
        "images": [{"id": i} for i in REFERENCES],
        "annotations": [{"id": 200 + i, "image_id": i, "caption": c} for i, cs in REFERENCES.items() for c in cs]}))
    return ann


def hand_chair(captions: dict[int, str]) -> dict:
    """CHAIR of captions made of words the test knows (no plurals, no two-word objects): objects =
    person (man, woman), bicycle (bike), car, cat, dog, bench; gt = annotated ∪ named by a reference."""
    lexicon = {"man": "person", "woman": "person", "person": "person", "bike": "bicycle", "bicycle": "bicycle",
               "car": "car", "cat": "cat", "dog": "dog", "bench": "bench"}
    names = {c["id"]: c["name"] for c in CATEGORIES}

    def objects(text: str) -> list[str]:
        return [lexicon[w] for w in text.lower().replace(".", " ").split() if w in lexicon]

    hall_caps = mentions = hall = gt_total = recalled = 0
    for image, caption in captions.items():
        gt = {names[c] for c in INSTANCES[image]} | {o for r in REFERENCES[image] for o in objects(r)}
        said = objects(caption)
        wrong = [o for o in said if o not in gt]
        hall_caps += bool(wrong)
        mentions, hall = mentions + len(said), hall + len(wrong)
        gt_total, recalled = gt_total + len(gt), recalled + len(set(said) & gt)
    return {"CHAIRs": 100 * hall_caps / len(captions), "CHAIRi": 100 * hall / mentions if mentions else 0.0,
            "recall": 100 * recalled / gt_total}


@pytest.mark.slow
def test_evaluate_metrics_chair_on_coco_captions(tmp_path):
    ann = write_coco(tmp_path)
    tf = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-idefics2")
    config = evaluate.EvalConfig(task="coco_caption", modes=("zero-shot",), n_queries=3, batch_size=3, num_beams=1,
                                 data_root=str(tmp_path), results_dir=str(tmp_path / "results"), device="cpu",
                                 runs_dir=str(tmp_path / "runs"), metrics=("chair",), coco_annotations=str(ann))
    out = evaluate.run(config, loaded=loaded, show_progress=False)
    payload = out["results"]["zero-shot"]
    produced = {int(r["id"]): r["prediction"] for r in payload["records"]}
    assert sorted(produced) == [4, 5, 6]
    chair = payload["chair"]
    # the tiny model's captions (deterministic byte soup) name no object outside the test's lexicon, so the
    # hand count applies to them
    known = {"person", "bicycle", "car", "cat", "dog", "bench"}
    assert all(set(r["chair"]["mentioned"]) <= known for r in payload["records"])
    assert {k: chair[k] for k in ("CHAIRs", "CHAIRi", "recall")} == pytest.approx(hand_chair(produced))
    assert chair["n_captions"] == 3 and "per_caption" not in chair

    # the same run with constructed captions in place of the generated ones: evaluate re-uses the saved
    # records (same prompts and fingerprint) and scores these captions
    path = Path(out["files"]["zero-shot"])
    data = json.loads(path.read_text())
    constructed = {"4": "A dog and a cat.", "5": "A woman driving a car.", "6": "A cat sitting on a bench."}
    for record in data["records"]:
        record["prediction"] = constructed[record["id"]]
    path.write_text(json.dumps(data))
    out = evaluate.run(config, loaded=loaded, show_progress=False)
    chair = out["results"]["zero-shot"]["chair"]
    # 4: dog (annotated), cat (hallucinated); 5: woman -> person, car, both annotated; bicycle (named by the
    # reference) missed; 6: cat, bench, nothing annotated: both hallucinated. CHAIRs = 2 of 3 captions;
    # CHAIRi = 3 hallucinated of 6 mentions = 50; recall = (1 + 2 + 0) of (1 + 3 + 0) gt objects = 75
    assert hand_chair({int(k): v for k, v in constructed.items()}) == pytest.approx(
        {"CHAIRs": 200 / 3, "CHAIRi": 50.0, "recall": 75.0})
    assert {k: chair[k] for k in ("CHAIRs", "CHAIRi", "recall")} == pytest.approx(
        {"CHAIRs": 200 / 3, "CHAIRi": 50.0, "recall": 75.0})
    assert (chair["n_mentions"], chair["n_hallucinated"], chair["n_gt_objects"]) == (6, 3, 4)
    records = {r["id"]: r for r in out["results"]["zero-shot"]["records"]}
    assert records["6"]["chair"] == {"mentioned": ["cat", "bench"], "hallucinated": ["cat", "bench"]}
    table = (tmp_path / "results" / "coco_caption" / "table.md").read_text()
    assert "| zero-shot | 66.67 | 50.00 | 75.00 | 3 | 6 |" in table


def test_metrics_chair_refusals(tmp_path):
    base = dict(modes=("zero-shot",), model="no-such-model", results_dir=str(tmp_path / "results"),
                runs_dir=str(tmp_path / "runs"), metrics=("chair",))
    with pytest.raises(UserError, match="scores image captions, and task shapes_vqa is a vqa task"):
        evaluate.run(evaluate.EvalConfig(task="shapes_vqa", **base), show_progress=False)
    write_coco(tmp_path)
    config = evaluate.EvalConfig(task="coco_caption", data_root=str(tmp_path), n_queries=3,
                                 coco_annotations=str(tmp_path / "elsewhere"), **base)
    with pytest.raises(UserError, match="annotation folder .*elsewhere not found"):
        evaluate.run(config, show_progress=False)
    (tmp_path / "coco" / "annotations" / "captions_val2014.json").unlink()
    config = evaluate.EvalConfig(task="coco_caption", data_root=str(tmp_path), n_queries=3, **base)
    with pytest.raises(UserError, match=r"no captions_\*\.json in .*coco/annotations"):  # the default folder
        evaluate.run(config, show_progress=False)
    with pytest.raises(ConfigError, match="'metrics': got 'spice'"):
        evaluate.run(evaluate.EvalConfig(task="coco_caption", **{**base, "metrics": ("spice",)}), show_progress=False)


def write_seed(root: Path) -> None:
    folder = root / "seed_bench"
    folder.mkdir(parents=True)
    rows = seed_rows()
    (folder / "SEED-Bench.json").write_text(json.dumps({"questions": rows}))
    for k, r in enumerate(rows[:-1]):
        picture(folder / "SEED-Bench-image" / r["data_id"], colour=(30 * k, 60, 90), size=(32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["mme", "seed_bench"])
def test_evaluate_reports_the_benchmark_breakdown(tmp_path, task_name):
    """zero-shot and 1-shot ICL on a tiny Idefics2: the payload's breakdown, recomputed here from the
    saved predictions by the benchmarks' rules, and its table in table.md."""
    write_mme(tmp_path) if task_name == "mme" else write_seed(tmp_path)
    tf = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-idefics2")
    config = evaluate.EvalConfig(task=task_name, modes=("zero-shot", "icl"), shots=1, n_queries=0, batch_size=4,
                                 num_beams=1, data_root=str(tmp_path), results_dir=str(tmp_path / "results"),
                                 device="cpu", runs_dir=str(tmp_path / "runs"))
    out = evaluate.run(config, loaded=loaded, show_progress=False)
    # a tiny random model gets everything wrong: put right and wrong answers in its saved records, which the
    # next run re-uses (same prompts and fingerprint) and scores
    for path in out["files"].values():
        data = json.loads(Path(path).read_text())
        for k, record in enumerate(data["records"]):
            record["prediction"] = (record["answers"][0].lower() if task_name == "mme" else record["answers"][0]
                                    ) if k % 3 else "maybe"
        Path(path).write_text(json.dumps(data))
    out = evaluate.run(config, loaded=loaded, show_progress=False)
    task = load_task(task_name, data_root=str(tmp_path))
    examples = {e.id: e for e in task.split("eval")}
    support_images = images_of(task.split("support"))
    table = (tmp_path / "results" / task_name / "table.md").read_text()
    for payload in out["results"].values():
        records = payload["records"]
        assert {r["id"] for r in records} == set(examples)
        for r in records:  # demonstrations come from the support images only
            assert not {examples[r["id"]].meta["image"]} & support_images
            assert all(d not in examples for d in r["demo_ids"])
        # after postprocessing a prediction is the parsed answer (yes / no, a letter) or scores wrong
        right = {r["id"]: r["prediction"].lower() == r["answers"][0].lower() for r in records}
        if task_name == "mme":
            by_image: dict[tuple, list[bool]] = {}
            for r in records:
                meta = examples[r["id"]].meta
                by_image.setdefault((meta["subtask"], meta["image"]), []).append(right[r["id"]])
            expected = {}
            for subtask in MME_LAYOUT:
                pairs = [v for (s, _), v in by_image.items() if s == subtask]
                acc = 100 * sum(sum(p) for p in pairs) / (2 * len(pairs))
                acc_plus = 100 * sum(all(p) for p in pairs) / len(pairs)
                expected[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": 2 * len(pairs)}
            assert set(payload["by_subtask"]) == set(expected) and 0 < payload["score"] < 100
            for subtask, values in expected.items():
                assert payload["by_subtask"][subtask] == pytest.approx(values)
            perception = expected["existence"]["score"] + expected["artwork"]["score"]
            assert payload["mme"] == pytest.approx({"perception": perception,
                                                    "cognition": expected["code_reasoning"]["score"],
                                                    "total": perception + expected["code_reasoning"]["score"],
                                                    "images": len(by_image), "left_out": 0})
            assert payload["score"] == pytest.approx(100 * sum(right.values()) / len(right))
            assert f"{payload['mme']['perception']:.2f} | {payload['mme']['cognition']:.2f}" in table
        else:
            per_type: dict[str, list[bool]] = {}
            for r in records:
                per_type.setdefault(examples[r["id"]].meta["question_type"], []).append(right[r["id"]])
            expected = {"overall": 100 * sum(right.values()) / len(right),
                        **{t: 100 * sum(v) / len(v) for t, v in per_type.items()}}
            assert payload["by_question_type"] == pytest.approx(expected)
            assert payload["score"] == pytest.approx(expected["overall"]) and 0 < payload["score"] < 100
            assert "By question type (SEED-Bench accuracy, %):" in table


def test_chair_ids_that_are_not_ids_are_one_line(tmp_path):
    """An id that is a list (valid JSON, not COCO's schema) was a TypeError when looked up."""
    from pipeline.chair import Chair

    instances = {"categories": CATEGORIES, "annotations": [{"image_id": 4, "category_id": 18}]}
    captions = {"annotations": [{"image_id": [4], "caption": "A dog."}]}
    with pytest.raises(UserError, match=r"annotations\[0\]\.image_id is \[4\]; expected an integer id"):
        Chair(instances, captions)
    bad = {"categories": [{"id": [1], "name": "person"}], "annotations": []}
    with pytest.raises(UserError, match=r"categories\[0\]\.id is \[1\]; expected an integer id"):
        Chair(bad, {"annotations": []})


def test_table_renders_results_with_partial_breakdowns():
    """Result files written before a breakdown existed, or with part of it, still render: a missing
    number is "-", the numbers present are printed."""
    base = {"mode": "zero-shot", "name": "zero-shot", "metric": "mme_accuracy", "score": 50.0, "n": 4,
            "mean_latency_ms": 10.0, "mean_prompt_tokens": 5.0, "settings": {"model": "m", "split": "eval", "n": 4}}
    old = evaluate.results_table([base], "mme", 0)
    assert "| zero-shot | 50.00 | 4 |" in old and "MME (" not in old
    partial = {**base, "mme": {"perception": 120.5}, "by_subtask": {"OCR": {"acc": 50.0}, "count": 3},
               "chair": {"CHAIRs": 12.5}}
    table = evaluate.results_table([partial], "mme", 0)
    assert "| zero-shot | 120.50 | - | - | - | 0 |" in table
    assert "| zero-shot | 50.0 / - | - / - |" in table
    assert "| zero-shot | 12.50 | - | - | - | - |" in table
