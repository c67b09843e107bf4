"""VQAv2, OK-VQA and COCO captions from HuggingFace dataset ids (``source: hub``).

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
from pipeline.tasks.official import ExampleView, check_first_images, checked_image, image_path, split_loaders

SOURCE_KEYS = ("id", "split", "columns", "name", "revision", "answer_key", "image_path")
COLUMN_KEYS = ("id", "question", "answers", "image")


def check_source(task: str, which: str, source: Any) -> list[str]:
    """Problems with one ``hub.<which>`` block (empty when it is valid)."""
    if not isinstance(source, dict):
        return [f"hub.{which} must be a mapping with keys {', '.join(SOURCE_KEYS)}"]
    errors = [f"hub.{which}.{k} is missing" for k in ("id", "split", "columns") if k not in source]
    errors += [
        f"hub.{which}: unknown key '{k}' (valid: {', '.join(SOURCE_KEYS)})"
        for k in source
        if k not in SOURCE_KEYS
    ]
    columns = source.get("columns", {})
    if not isinstance(columns, dict):
        return errors + [f"hub.{which}.columns must map {', '.join(COLUMN_KEYS)} to column names"]
    errors += [
        f"hub.{which}.columns: unknown key '{k}' (valid: {', '.join(COLUMN_KEYS)})"
        for k in columns
        if k not in COLUMN_KEYS
    ]
    errors += [f"hub.{which}.columns.{k} is missing" for k in ("id", "answers") if k not in columns]
    if "image" in columns and "image_path" in source:
        errors.append(f"hub.{which}: give columns.image or image_path, not both")
    return errors


def _answers(value: Any, answer_key: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(a[answer_key] if answer_key else a) for a in value)


def hub_view(dataset: Any, source: dict[str, Any], data_root: str | Path, task: str) -> ExampleView:
    """``Example``s over a loaded HF ``Dataset`` through the source's column mapping."""
    columns, answer_key = source["columns"], source.get("answer_key")
    template, root = source.get("image_path"), Path(data_root).expanduser()
    missing = [c for c in columns.values() if c is not None and c not in dataset.column_names]
    if missing:
        raise UserError(
            f"task {task}: HF dataset {source['id']} ({source['split']}) has no column(s) {missing}; "
            f"it has {dataset.column_names}. Fix hub.*.columns in the task YAML"
        )

    def to_example(row: dict[str, Any]) -> Example:
        image = row[columns["image"]] if columns.get("image") else None
        if template:
            image = checked_image(image_path(root, template, row), f"task {task}, row {row[columns['id']]}")
        return Example(
            id=str(row[columns["id"]]),
            question=str(row[columns["question"]]) if columns.get("question") else "",
            answers=_answers(row[columns["answers"]], answer_key),
            image=image,
        )

    return check_first_images(ExampleView(dataset, to_example, columns["id"]))


def offline_hint() -> str:
    """What to do instead of the hub when it cannot be reached."""
    return (
        "Without network, use the official files on disk instead (source=official, with --data-root DIR "
        "or MIMIC_DATA=DIR pointing at the layout described in pipeline/tasks/official.py), or write a "
        "user YAML task over local JSONL/CSV/Parquet files and pass its path as the task."
    )


def load_hub_dataset(source: dict[str, Any], cache_dir: str | None, task: str) -> Any:
    """``datasets.load_dataset(id, name, split=...)``; any failure becomes a ``UserError``."""
    import datasets

    try:
        return datasets.load_dataset(
            source["id"],
            source.get("name"),
            split=source["split"],
            revision=source.get("revision"),
            cache_dir=cache_dir,
        )
    except Exception as err:  # network, auth, missing split: all mean "cannot get it from the hub"
        raise UserError(
            f"task {task}: could not load HF dataset '{source['id']}' split '{source['split']}' "
            f"({type(err).__name__}: {str(err)[:300]}). {offline_hint()}"
        ) from err


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
