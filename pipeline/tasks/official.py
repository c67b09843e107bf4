"""VQAv2, OK-VQA, OCR-VQA, COCO and Flickr30k captions (Karpathy splits) from the official files on disk.

The VQA and Karpathy JSON files are read through the ``datasets`` json builder (``field="questions"``
etc.), so the first load converts them to Arrow in the HF datasets cache and later loads are
memory-mapped. A split is an ``ExampleView``: a lazy sequence of ``Example`` built row by row at
access; images stay paths (resolved from a template under the data root) and are checked when a row
is read.

Layout under the data root (each path is data in ``configs/tasks/<name>.yaml``)::

    vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    vqav2/v2_mscoco_{train,val}2014_annotations.json
    okvqa/OpenEnded_mscoco_{train,val}2014_questions.json
    okvqa/mscoco_{train,val}2014_annotations.json
    coco/dataset_coco.json                        (Karpathy split)
    coco/train2014/COCO_train2014_000000000009.jpg
    coco/val2014/COCO_val2014_000000000042.jpg
    flickr30k/dataset_flickr30k.json              (Karpathy split)
    flickr30k/flickr30k-images/1000092795.jpg
    ocr_vqa/dataset.json                          (keyed by image id; split 1 train, 2 val, 3 test)
    ocr_vqa/images/0001055178.jpg                 (the OCR-VQA downloader's names: <image id>.jpg)
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, UserError
from pipeline.tasks.base import Example

IMAGES_CHECKED_AT_LOAD = 3
"""How many rows of a split have their image checked when the split is loaded (the rest at access)."""

VQA_KEYS = ("questions", "annotations", "images")
KARPATHY_KEYS = ("karpathy", "images", "support_splits", "eval_splits")
OCR_VQA_KEYS = ("dataset", "images", "support_splits", "eval_splits")
OCR_VQA_SPLITS = {"train": 1, "val": 2, "test": 3}
"""The ``split`` codes of OCR-VQA's dataset.json."""


class ExampleView(Sequence):
    """A lazy, read-only sequence of ``Example`` over the rows of a ``datasets.Dataset``.

    ``to_example(row)`` turns one row (a dict) into an ``Example``; it runs at each access, so
    nothing is decoded up front. ``select`` gives the view of a subset of rows (no copy).
    ``id_column`` (with ``id_prefix``) lets ``ids()`` read every id from Arrow without building rows.
    """

    def __init__(
        self,
        dataset: Any,
        to_example: Callable[[dict[str, Any]], Example],
        id_column: str | None = None,
        id_prefix: str = "",
    ):
        self.dataset = dataset
        self.to_example = to_example
        self.id_column, self.id_prefix = id_column, id_prefix

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        return self.to_example(self.dataset[index % n])

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def select(self, indices: Sequence[int]) -> ExampleView:
        return ExampleView(
            self.dataset.select(list(indices)), self.to_example, self.id_column, self.id_prefix
        )

    def ids(self) -> list[str]:
        """Every example id in order; fast (one column read) when the view knows its id column."""
        if self.id_column is None:
            return [example.id for example in self]
        return [f"{self.id_prefix}{v}" for v in column_values(self.dataset, self.id_column)]


def column_values(dataset: Any, name: str) -> list[Any]:
    """One column as a Python list, read through Arrow (iterating a ``Column`` decodes row by row)."""
    return dataset.select_columns([name]).with_format("arrow")[:][name].to_pylist()


def seeded_order(n: int, seed: int, salt: str) -> list[int]:
    """A permutation of ``range(n)`` fixed by (seed, salt), the same on every machine."""
    order = list(range(n))
    random.Random(f"{seed}:{salt}").shuffle(order)
    return order


def _take(view: ExampleView, size: int | None, order: list[int], what: str, task: str) -> ExampleView:
    if size is None:
        return view
    if size > len(view):
        raise UserError(
            f"task {task}: {what} asks for {size} examples but its source has only {len(view)}; "
            f"pass {what} <= {len(view)}"
        )
    return view.select(order[:size])


def split_loaders(read_support: Callable[[], ExampleView], read_eval: Callable[[], ExampleView], cfg: Any):
    """support / train / eval loaders for a task whose queries and demonstrations share one source.

    support: the whole training source (or ``support_size`` of it after a seeded shuffle);
    train: the first ``train_size`` after the same seeded shuffle (a subset of the training source;
    the demonstration sampler excludes the query itself); eval: the evaluation source, or
    ``eval_size`` of it after a seeded shuffle.
    """
    read_support = functools.cache(read_support)

    def support() -> ExampleView:
        view = read_support()
        return _take(
            view, cfg.support_size, seeded_order(len(view), cfg.seed, "train"), "support_size", cfg.name
        )

    def train() -> ExampleView:
        view = read_support()
        return _take(view, cfg.train_size, seeded_order(len(view), cfg.seed, "train"), "train_size", cfg.name)

    def evaluation() -> ExampleView:
        view = read_eval()
        return _take(view, cfg.eval_size, seeded_order(len(view), cfg.seed, "eval"), "eval_size", cfg.name)

    return {"support": support, "train": train, "eval": evaluation}


def image_path(root: Path, template: str, row: dict[str, Any]) -> Path:
    """The image file of a row: ``template`` (e.g. ``coco/val2014/COCO_val2014_{image_id:012d}.jpg``)
    filled with the row's fields, under ``root``."""
    return root / template.format(**row)


def checked_image(path: Path, where: str) -> str:
    """``path`` as a string if the file exists; otherwise a ``UserError`` naming it."""
    if not path.is_file():
        raise UserError(
            f"image file {path} not found (needed by {where}); put the task's images under the data root "
            f"as its layout says (pipeline/tasks/official.py), or fix the data root (--data-root / MIMIC_DATA)"
        )
    return str(path)


def check_first_images(view: ExampleView, n: int = IMAGES_CHECKED_AT_LOAD) -> ExampleView:
    """Read the first ``n`` rows so a wrong image folder fails at load, not hours later."""
    for i in range(min(n, len(view))):
        view[i]
    return view


def load_json_records(path: Path, field: str, cache_dir: str | None) -> Any:
    """The list under ``field`` of a JSON file as a ``datasets.Dataset`` (Arrow-cached)."""
    import datasets

    try:
        return datasets.load_dataset(
            "json", data_files=str(path), field=field, split="train", cache_dir=cache_dir
        )
    except Exception as err:  # broken or empty JSON (StopIteration), a missing field: the file is at fault
        from pipeline.tasks.faults import json_fault

        fault = json_fault(path, lines=False) if path.is_file() else None
        if fault == "empty":
            raise UserError(f"{path} is empty; expected a JSON object with a '{field}' list") from err
        if fault is not None and fault.startswith("line"):
            raise UserError(f"{path} {fault}; expected a JSON object with a '{field}' list") from err
        cause = err.__cause__ or err  # DatasetGenerationError wraps the parser's message
        message = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        raise UserError(
            f"could not read the '{field}' list of {path}: {type(cause).__name__}: {message}"
        ) from err


def _vqa_dataset(root: Path, files: dict[str, str], cfg: Any) -> Any:
    """Annotations joined with their questions (by ``question_id``) as one Dataset."""
    questions = load_json_records(root / files["questions"], "questions", cfg.cache_dir)
    annotations = load_json_records(root / files["annotations"], "annotations", cfg.cache_dir)
    q_ids, a_ids = column_values(questions, "question_id"), column_values(annotations, "question_id")
    texts = column_values(questions, "question")
    if q_ids != a_ids:
        position = {qid: i for i, qid in enumerate(q_ids)}
        missing = [qid for qid in a_ids if qid not in position]
        if missing:
            raise UserError(
                f"{root / files['annotations']}: question_id {missing[0]} (and {len(missing) - 1} more) "
                f"has no question in {root / files['questions']}; are the two files from the same split?"
            )
        texts = [texts[position[qid]] for qid in a_ids]
    # a fingerprint from the files themselves: hashing 400k questions would take longer than the join
    stamp = [
        (str(root / files[k]), (root / files[k]).stat().st_mtime_ns) for k in ("questions", "annotations")
    ]
    fingerprint = hashlib.sha256(repr(stamp).encode()).hexdigest()[:32]
    return annotations.add_column("question", texts, new_fingerprint=fingerprint)


def vqa_view(root: Path, files: dict[str, str], cfg: Any) -> ExampleView:
    """One VQAv2 / OK-VQA split: every human answer kept (OK-VQA's doubled five answers included)."""
    dataset = _vqa_dataset(root, files, cfg)
    where = f"task {cfg.name}"

    def to_example(row: dict[str, Any]) -> Example:
        path = image_path(root, files["images"], row)
        return Example(
            id=str(row["question_id"]),
            question=row["question"],
            answers=tuple(a["answer"] for a in row["answers"]),
            image=checked_image(path, f"{where}, question {row['question_id']}"),
            meta={"answer_type": row["answer_type"]} if row.get("answer_type") else None,
        )

    return check_first_images(ExampleView(dataset, to_example, "question_id"))


def karpathy_view(root: Path, files: dict[str, Any], splits: Sequence[str], cfg: Any) -> ExampleView:
    """The images of the Karpathy split(s) ``splits`` with all their reference captions.

    The id is the field ``files["id"]`` of each image (default ``cocoid``; Flickr30k has ``imgid`` only).
    """
    path = root / files["karpathy"]
    dataset = load_json_records(path, "images", cfg.cache_dir)
    id_field = files.get("id", "cocoid")
    missing = [k for k in (id_field, "split", "sentences") if k not in dataset.column_names]
    if missing:
        raise UserError(
            f"task {cfg.name}: the images of {path} have no field(s) {missing} (they have "
            f"{dataset.column_names}); is it a Karpathy split file (dataset_coco.json, dataset_flickr30k.json)?"
        )
    wanted = set(splits)
    found = column_values(dataset, "split")
    keep = [i for i, s in enumerate(found) if s in wanted]
    if not keep:  # an empty split would evaluate (or draw demonstrations from) nothing
        raise UserError(f"task {cfg.name}: {path} has no image in split(s) {list(splits)} (it has "
                        f"{sorted({str(s) for s in found})}); is it the full Karpathy split file?")
    where = f"task {cfg.name}"

    def to_example(row: dict[str, Any]) -> Example:
        image = image_path(root, files["images"], row)
        return Example(
            id=str(row[id_field]),
            question="",
            answers=tuple(s["raw"].strip() for s in row["sentences"]),
            image=checked_image(image, f"{where}, image {row[id_field]}"),
        )

    return check_first_images(ExampleView(dataset.select(keep), to_example, id_field))


@functools.lru_cache(maxsize=2)
def _ocr_vqa_columns(path: Path, stamp: tuple[int, int]) -> dict[int, dict[str, list[str]]]:
    """OCR-VQA's dataset.json as one question per row, by split code: ``{split: {column: values}}``.

    Read with ``json`` rather than the ``datasets`` json builder: the file is one object keyed by image
    id, which that builder would read as a single row with an image per column. ``stamp`` (the file's
    mtime and size) keys the cache, so the support and eval splits parse the file once.
    """
    from pipeline.tasks.faults import read_text

    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} line {err.lineno}: invalid JSON ({err.msg}); expected OCR-VQA's dataset.json"
        ) from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object keyed by image id (OCR-VQA's dataset.json), "
                        f"got {type(data).__name__}")
    splits: dict[int, dict[str, list[str]]] = {}
    for image_id, info in data.items():
        missing = [k for k in ("questions", "answers", "split") if not isinstance(info, dict) or k not in info]
        if missing:
            raise UserError(f"{path}: image {image_id} has no {', '.join(repr(k) for k in missing)}")
        questions, answers = info["questions"], info["answers"]
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            raise UserError(f"{path}: image {image_id} needs one answer per question (lists of equal length); "
                            f"got {_count(questions)} questions and {_count(answers)} answers")
        code = info["split"]
        if code not in OCR_VQA_SPLITS.values() or isinstance(code, bool):  # "1" or [1] would drop the image
            raise UserError(f"{path}: image {image_id} has split {code!r}; expected 1 (train), 2 (val) or 3 (test)")
        nulls = [k for k in ("questions", "answers") if any(v is None for v in info[k])]
        if nulls:  # str(None) would become the question or answer "None"
            raise UserError(f"{path}: image {image_id} has a null in its {nulls[0]}; expected text")
        columns = splits.setdefault(code, {k: [] for k in ("question_id", "image_id", "question", "answer")})
        for k, (question, answer) in enumerate(zip(questions, answers, strict=True)):
            columns["question_id"].append(ocr_vqa_question_id(image_id, k))
            columns["image_id"].append(str(image_id))
            columns["question"].append(str(question))
            columns["answer"].append(str(answer))
    return splits


def _count(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else f"a {type(value).__name__} of"


def ocr_vqa_question_id(image_id: Any, index: int) -> str:
    """The id of an image's ``index``-th question, as the MimIC code numbers them: image id + 2 digits."""
    return f"{image_id}{index:02d}"


def ocr_vqa_view(root: Path, files: dict[str, Any], splits: Sequence[str], cfg: Any) -> ExampleView:
    """The questions of the OCR-VQA split(s) ``splits`` (train / val / test), one ``Example`` each with
    its single answer."""
    import datasets

    path = root / files["dataset"]
    by_code = _ocr_vqa_columns(path, (path.stat().st_mtime_ns, path.stat().st_size))
    codes = [OCR_VQA_SPLITS[s] for s in splits]
    parts = [datasets.Dataset.from_dict(by_code[code]) for code in codes if code in by_code]
    if not parts:
        raise UserError(f"task {cfg.name}: {path} has no question in split(s) {list(splits)} "
                        f"(split codes {codes}; it has {sorted(by_code)})")
    where = f"task {cfg.name}"

    def to_example(row: dict[str, Any]) -> Example:
        image = image_path(root, files["images"], row)
        return Example(
            id=row["question_id"],
            question=row["question"],
            answers=(row["answer"],),
            image=checked_image(image, f"{where}, question {row['question_id']}"),
        )

    return check_first_images(ExampleView(datasets.concatenate_datasets(parts), to_example, "question_id"))


def _layout(cfg: Any) -> list[str]:
    off = cfg.official
    if cfg.loader == "karpathy":
        return [off["karpathy"], off["images"]]
    if cfg.loader == "ocr_vqa":
        return [off["dataset"], off["images"]]
    return [files[k] for files in (off["support"], off["eval"]) for k in VQA_KEYS]


def _check_official_config(cfg: Any) -> None:
    off, errors = cfg.official, []
    if cfg.loader == "karpathy":
        errors += [f"official.{k} is missing" for k in KARPATHY_KEYS if k not in off]
    elif cfg.loader == "ocr_vqa":
        errors += [f"official.{k} is missing" for k in OCR_VQA_KEYS if k not in off]
        for key in ("support_splits", "eval_splits"):
            bad = [s for s in off.get(key, []) if s not in OCR_VQA_SPLITS]
            if bad or not off.get(key, ["-"]):
                errors.append(f"official.{key}: got {off.get(key)!r}, expected a list of "
                              f"{', '.join(OCR_VQA_SPLITS)}")
    else:
        for split in ("support", "eval"):
            files = off.get(split)
            if not isinstance(files, dict):
                errors.append(f"official.{split} must map {', '.join(VQA_KEYS)} to paths")
                continue
            errors += [f"official.{split}.{k} is missing" for k in VQA_KEYS if k not in files]
    if errors:
        raise ConfigError(f"task {cfg.name}: invalid 'official' section:\n  - " + "\n  - ".join(errors))


def official_loaders(cfg: Any) -> dict[str, Callable[[], ExampleView]]:
    """Split loaders of a ``loader: vqa``, ``karpathy`` or ``ocr_vqa`` task from files under ``data_root``.

    Checks at once that every annotation file exists (a missing one is a one-line ``UserError`` naming
    it and the expected layout); images are checked for the first rows at load and each row at access.
    """
    _check_official_config(cfg)
    root = Path(cfg.data_root).expanduser()
    json_files = [p for p in _layout(cfg) if "{" not in p]
    for rel in json_files:
        if not (root / rel).is_file():
            layout = ", ".join(dict.fromkeys(_layout(cfg)))
            raise UserError(
                f"task {cfg.name}: file {root / rel} not found; expected under the data root {root}: {layout}. "
                f"Set the data root with --data-root or MIMIC_DATA, or load from the HuggingFace hub with "
                f"source=hub."
            )
    off = cfg.official
    if cfg.loader in ("karpathy", "ocr_vqa"):
        view = karpathy_view if cfg.loader == "karpathy" else ocr_vqa_view
        return split_loaders(
            lambda: view(root, off, off["support_splits"], cfg),
            lambda: view(root, off, off["eval_splits"], cfg),
            cfg,
        )
    return split_loaders(
        lambda: vqa_view(root, off["support"], cfg), lambda: vqa_view(root, off["eval"], cfg), cfg
    )
