"""VQAv2, OK-VQA, OCR-VQA, COCO and Flickr30k captions from HuggingFace dataset ids (``source: hub``).

Which dataset, split and columns to read is data in the task's YAML, one block per source::

    hub:
      support:                      # demonstrations; training queries are a seeded subset of it
        id: pminervini/VQAv2        # HF dataset id (``name``: config, ``revision``: optional)
        split: train
        columns: {id: question_id, question: question, answers: answers}
        answer_key: answer          # answers are dicts: take this key of each
        image_path: coco/train2014/COCO_train2014_{image_id:012d}.jpg   # no image column: a file
      eval:                         # under the data root, from a template over the row's fields
        id: lmms-lab/VQAv2
        split: validation
        columns: {id: question_id, question: question, answers: answers, image: image}
        answer_key: answer
        meta: {answer_type: answer_type}   # Example.meta from columns (the per-answer-type report)

``split`` may be a list (``[train, restval]``): the splits are read and concatenated in that order.
``one_per_question: true`` reads rows whose ``question`` and ``answers`` columns are parallel lists
(OCR-VQA: an image with its questions) as one ``Example`` per question, with that single answer and
the id ``<id><index:02d>`` (the MimIC code's OCR-VQA question ids).
``columns`` maps the ``Example`` fields ``id``, ``question`` (omit for captions), ``answers`` (a
list, or a string for a single reference) and ``image`` (an Image column) to column names.
Without network every load fails; the error names the offline alternatives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, UserError
from pipeline.tasks.base import Example
from pipeline.tasks.official import (
    ExampleView,
    check_first_images,
    checked_image,
    column_values,
    image_path,
    ocr_vqa_question_id,
    split_loaders,
)

SOURCE_KEYS = (
    "id", "split", "columns", "name", "revision", "answer_key", "image_path", "meta", "one_per_question"
)
COLUMN_KEYS = ("id", "question", "answers", "image")


def check_source(task: str, which: str, source: Any) -> list[str]:
    """Problems with one ``hub.<which>`` block (empty when it is valid); ``which`` "" names the ``hub``
    block itself (a user task reading one dataset split)."""
    key = f"hub.{which}" if which else "hub"
    if not isinstance(source, dict):
        return [f"{key} must be a mapping with keys {', '.join(SOURCE_KEYS)}"]
    errors = [f"{key}.{k} is missing" for k in ("id", "split", "columns") if k not in source]
    errors += [
        f"{key}: unknown key '{k}' (valid: {', '.join(SOURCE_KEYS)})"
        for k in source
        if k not in SOURCE_KEYS
    ]
    columns = source.get("columns", {})
    if not isinstance(columns, dict):
        return errors + [f"{key}.columns must map {', '.join(COLUMN_KEYS)} to column names"]
    errors += [
        f"{key}.columns: unknown key '{k}' (valid: {', '.join(COLUMN_KEYS)})"
        for k in columns
        if k not in COLUMN_KEYS
    ]
    errors += [f"{key}.columns.{k} is missing" for k in ("id", "answers") if k not in columns]
    if "image" in columns and "image_path" in source:
        errors.append(f"{key}: give columns.image or image_path, not both")
    split = source.get("split", "-")
    if not (isinstance(split, str) and split) and not (
        isinstance(split, list) and split and all(isinstance(x, str) and x for x in split)
    ):
        errors.append(f"{key}.split: got {split!r}, expected a split name or a list of split names")
    meta = source.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in [*meta, *meta.values()]):
        errors.append(f"{key}.meta must map Example.meta keys to column names, got {meta!r}")
    if source.get("one_per_question", False) not in (True, False):
        errors.append(f"{key}.one_per_question: got {source['one_per_question']!r}, expected true or false")
    elif source.get("one_per_question") and "question" not in columns:
        errors.append(f"{key}: one_per_question needs columns.question (a list per row)")
    return errors


def _answers(value: Any, answer_key: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    from pipeline.tasks.user import as_text  # numbers spelt as a data file's are ("4", not "4.0")

    if isinstance(value, (int, float)) and not isinstance(value, bool):  # a number column: one answer
        return (as_text(value),)
    return tuple(as_text(a[answer_key] if answer_key else a) for a in value)


def hub_view(dataset: Any, source: dict[str, Any], data_root: str | Path, task: str) -> ExampleView:
    """``Example``s over a loaded HF ``Dataset`` through the source's column mapping."""
    columns, answer_key = source["columns"], source.get("answer_key")
    template, root = source.get("image_path"), Path(data_root).expanduser()
    meta = source.get("meta") or {}
    wanted = [*columns.values(), *meta.values()]
    missing = [c for c in wanted if c is not None and c not in dataset.column_names]
    if missing:
        raise UserError(
            f"task {task}: HF dataset {source['id']} ({source['split']}) has no column(s) {missing}; "
            f"it has {dataset.column_names}. Fix hub.*.columns / hub.*.meta in the task YAML"
        )

    def to_example(row: dict[str, Any], pair: int | None = None) -> Example:
        image = row[columns["image"]] if columns.get("image") else None
        if template:
            image = checked_image(image_path(root, template, row), f"task {task}, row {row[columns['id']]}")
        question = row[columns["question"]] if columns.get("question") else ""
        raw = row[columns["answers"]]
        if pair is None and (raw is None or (isinstance(raw, list) and (not raw or any(
                a is None or (answer_key and isinstance(a, dict) and a.get(answer_key) is None) for a in raw)))):
            # no reference to score or show (most_frequent_answer), or the reference "None"
            raise UserError(f"task {task}: HF dataset {source['id']} ({source['split']}) id {row[columns['id']]}: "
                            f"column {columns['answers']!r} holds no answer or a null one ({raw!r})")
        answers = _answers(raw, answer_key)
        if pair is not None:
            question, answers = question[pair], answers[pair : pair + 1]
        values = {key: row[column] for key, column in meta.items() if row[column] not in (None, "")}
        return Example(
            id=str(row[columns["id"]]) if pair is None else ocr_vqa_question_id(row[columns["id"]], pair),
            question=str(question),
            answers=answers,
            image=image,
            meta=values or None,
        )

    if source.get("one_per_question"):
        return check_first_images(_per_question_view(dataset, source, task, to_example))
    return check_first_images(ExampleView(dataset, to_example, columns["id"]))


def _per_question_view(
    dataset: Any, source: dict[str, Any], task: str, to_example: Callable[..., Example]
) -> ExampleView:
    """One ``Example`` per (row, question) of rows holding parallel question / answer lists: a view over
    a small index (row, position, id) that reads the row, image included, only at access."""
    import datasets

    columns = source["columns"]
    ids = column_values(dataset, columns["id"])
    questions = column_values(dataset, columns["question"])
    answers = column_values(dataset, columns["answers"])
    index: dict[str, list[Any]] = {"row": [], "pair": [], "question_id": []}
    for row, (image_id, qs, ans) in enumerate(zip(ids, questions, answers, strict=True)):
        if not isinstance(qs, list) or not isinstance(ans, list) or len(qs) != len(ans):
            raise UserError(
                f"task {task}: HF dataset {source['id']} ({source['split']}) row {row} (id {image_id}) "
                f"needs one answer per question in columns {columns['question']!r} / {columns['answers']!r}; got "
                f"{len(qs) if isinstance(qs, list) else qs!r} questions and "
                f"{len(ans) if isinstance(ans, list) else ans!r} answers"
            )
        if any(v is None for v in [*qs, *ans]):  # str(None) would become the question or answer "None"
            raise UserError(
                f"task {task}: HF dataset {source['id']} ({source['split']}) row {row} (id {image_id}) holds a null "
                f"question or answer in columns {columns['question']!r} / {columns['answers']!r}"
            )
        for pair in range(len(qs)):
            index["row"].append(row)
            index["pair"].append(pair)
            index["question_id"].append(ocr_vqa_question_id(image_id, pair))
    if not index["row"]:
        raise UserError(f"task {task}: HF dataset {source['id']} ({source['split']}) holds no question in column "
                        f"{columns['question']!r}")
    return ExampleView(
        datasets.Dataset.from_dict(index),
        lambda entry: to_example(dataset[entry["row"]], entry["pair"]),
        "question_id",
    )


def offline_hint() -> str:
    """What to do instead of the hub when it cannot be reached."""
    return (
        "Without network, use the official files on disk instead (source=official, with --data-root DIR "
        "or MIMIC_DATA=DIR pointing at the layout described in pipeline/tasks/official.py), or write a "
        "user YAML task over local JSONL/CSV/Parquet files and pass its path as the task."
    )


def load_hub_dataset(source: dict[str, Any], cache_dir: str | None, task: str) -> Any:
    """``datasets.load_dataset(id, name, split=...)``, each split of a list of splits concatenated in
    order; any failure becomes a ``UserError``."""
    import datasets

    splits = source["split"] if isinstance(source["split"], list) else [source["split"]]
    parts = []
    for split in splits:
        try:
            parts.append(
                datasets.load_dataset(
                    source["id"],
                    source.get("name"),
                    split=split,
                    revision=source.get("revision"),
                    cache_dir=cache_dir,
                )
            )
        except Exception as err:  # network, auth, missing split: all mean "cannot get it from the hub"
            raise UserError(
                f"task {task}: could not load HF dataset '{source['id']}' split '{split}' "
                f"({type(err).__name__}: {str(err)[:300]}). {offline_hint()}"
            ) from err
    if len(parts) == 1:
        return parts[0]
    def refuse(why: str) -> UserError:
        return UserError(f"task {task}: the splits {splits} of HF dataset '{source['id']}' cannot be "
                         f"concatenated ({why}); list splits with the same columns")

    for split, part in zip(splits[1:], parts[1:], strict=True):
        # concatenate_datasets would fill a column one split lacks with nulls: refuse instead of reading None
        if set(part.column_names) != set(parts[0].column_names):
            raise refuse(f"split '{splits[0]}' has columns {parts[0].column_names}, split '{split}' has "
                         f"{part.column_names}")
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:  # the same columns with features that do not align
        raise refuse(str(err).strip().splitlines()[0][:300]) from err


def hub_loaders(cfg: Any) -> dict[str, Callable[[], ExampleView]]:
    """Split loaders of a built-in task read from the HF hub as ``cfg.hub`` describes."""
    errors = [e for which in ("support", "eval") for e in check_source(cfg.name, which, cfg.hub.get(which))]
    if errors:
        raise ConfigError(f"task {cfg.name}: invalid 'hub' section:\n  - " + "\n  - ".join(errors))

    def read(which: str) -> Callable[[], ExampleView]:
        source = cfg.hub[which]
        return lambda: hub_view(
            load_hub_dataset(source, cfg.cache_dir, cfg.name), source, cfg.data_root, cfg.name
        )

    return split_loaders(read("support"), read("eval"), cfg)
