"""VQAv2, OK-VQA and COCO captions (Karpathy split) from the official files on disk.

The JSON files are read through the ``datasets`` json builder (``field="questions"`` etc.), so the
first load converts them to Arrow in the HF datasets cache and later loads are memory-mapped.
A split is an ``ExampleView``: a lazy sequence of ``Example`` built row by row at access; images
stay paths (resolved from a template under the data root) and are checked when a row is read.

Layout under the data root (each path is data in ``configs/tasks/<name>.yaml``)::

    vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    vqav2/v2_mscoco_{train,val}2014_annotations.json
    okvqa/OpenEnded_mscoco_{train,val}2014_questions.json
    okvqa/mscoco_{train,val}2014_annotations.json
    coco/dataset_coco.json                        (Karpathy split)
    coco/train2014/COCO_train2014_000000000009.jpg
    coco/val2014/COCO_val2014_000000000042.jpg
"""

from __future__ import annotations

import functools
import hashlib
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
            f"image file {path} not found (needed by {where}); put the COCO images under the data root "
            f"as the task's layout says, or fix the data root (--data-root / MIMIC_DATA)"
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
    """The images of the Karpathy split(s) ``splits`` with all their reference captions."""
    dataset = load_json_records(root / files["karpathy"], "images", cfg.cache_dir)
    wanted = set(splits)
    keep = [i for i, s in enumerate(column_values(dataset, "split")) if s in wanted]
    where = f"task {cfg.name}"

    def to_example(row: dict[str, Any]) -> Example:
        path = image_path(root, files["images"], row)
        return Example(
            id=str(row["cocoid"]),
            question="",
            answers=tuple(s["raw"].strip() for s in row["sentences"]),
            image=checked_image(path, f"{where}, image {row['cocoid']}"),
        )

    return check_first_images(ExampleView(dataset.select(keep), to_example, "cocoid"))


def _layout(cfg: Any) -> list[str]:
    off = cfg.official
    if cfg.loader == "karpathy":
        return [off["karpathy"], off["images"]]
    return [files[k] for files in (off["support"], off["eval"]) for k in VQA_KEYS]


def _check_official_config(cfg: Any) -> None:
    off, errors = cfg.official, []
    if cfg.loader == "karpathy":
        errors += [f"official.{k} is missing" for k in KARPATHY_KEYS if k not in off]
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
    """Split loaders of a ``loader: vqa`` or ``loader: karpathy`` task from files under ``data_root``.

    Checks at once that every annotation file exists (a missing one is a ``UserError`` naming it
    and the expected layout); images are checked for the first rows at load and each row at access.
    """
    _check_official_config(cfg)
    root = Path(cfg.data_root).expanduser()
    json_files = [p for p in _layout(cfg) if "{" not in p]
    for rel in json_files:
        if not (root / rel).is_file():
            layout = "\n  ".join(str(root / p) for p in _layout(cfg))
            raise UserError(
                f"task {cfg.name}: file {root / rel} not found. Expected layout under the data root {root}:\n"
                f"  {layout}\nSet the data root with --data-root or MIMIC_DATA, or load from the "
                f"HuggingFace hub with source=hub."
            )
    off = cfg.official
    if cfg.loader == "karpathy":
        return split_loaders(
            lambda: karpathy_view(root, off, off["support_splits"], cfg),
            lambda: karpathy_view(root, off, off["eval_splits"], cfg),
            cfg,
        )
    return split_loaders(
        lambda: vqa_view(root, off["support"], cfg), lambda: vqa_view(root, off["eval"], cfg), cfg
    )
