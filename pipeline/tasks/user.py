"""User tasks: a YAML file naming local JSONL / JSON / CSV / Parquet files, read through ``datasets``.

Example (paths are relative to the YAML file; image paths relative to the data file)::

    name: antonyms
    kind: text                  # text | vqa | caption; default vqa when rows have an image, else text
    metric: exact_match         # default by kind: exact_match, vqa_accuracy, cider
    prompt: "Word:{question} Antonym:"
    answer: " {answer}"
    max_new_tokens: 5
    files: {support: support.jsonl, eval: eval.jsonl}   # or train: too
    # file: all.csv + split_column: split      (values support / train / eval)
    # file: all.parquet + split_ratios: {support: 0.8, eval: 0.2}
    fields: {question: word}    # only where a column is not named question/input, answers/answer, image, id

Columns: ``question`` or ``input``; ``answers`` (a list, or in CSV one string split on
``answers_separator``) or ``answer`` (a string); optional ``image`` (file path) and ``id``. Without a
``train`` split, training queries are the support split (or ``train_size`` of it, seeded).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, UserError, load_config, opt
from pipeline.tasks.base import SPLITS, Example, Task
from pipeline.tasks.official import ExampleView, check_first_images, column_values, seeded_order

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FIELD_NAMES = {
    "id": ("id",),
    "question": ("question", "input"),
    "answers": ("answers", "answer"),
    "image": ("image",),
}
DEFAULT_PROMPTS = {
    "vqa": "Question:{question} Short answer:",
    "caption": "Caption:",
    "text": "Input:{question} Output:",
}
DEFAULT_METRICS = {"vqa": "vqa_accuracy", "caption": "cider", "text": "exact_match"}
KINDS = tuple(DEFAULT_METRICS)
METRICS = tuple(DEFAULT_METRICS.values())


@dataclass(frozen=True)
class UserTaskConfig:
    """A user task YAML; every key can also be given as an option to ``load_task``."""

    name: str = opt("", "Task name (default: the YAML file name).")
    kind: str | None = opt(
        None, "vqa | caption | text (default: vqa if rows have an image, else text).", KINDS
    )
    metric: str | None = opt(None, "vqa_accuracy | cider | exact_match (default by kind).", METRICS)
    prompt: str | None = opt(None, "Query template with {question} (default by kind).")
    answer: str = opt(" {answer}", "Answer template with {answer}.")
    max_new_tokens: int = opt(10, "Generation budget.")
    files: dict = opt({}, "One data file per split: {support: ..., train: ..., eval: ...}.")
    file: str | None = opt(None, "One data file for all splits (with split_column or split_ratios).")
    split_column: str | None = opt(None, "Column of `file` naming each row's split (support/train/eval).")
    split_ratios: dict = opt(
        {}, "Fractions of `file` per split after a seeded shuffle, e.g. {support: 0.8, eval: 0.2}."
    )
    fields: dict = opt({}, "Column names for id / question / answers (or answer) / image when they differ.")
    answers_separator: str = opt("|", "Separator of several answers in one string cell (CSV).")
    seed: int = opt(3407, "Seed of split_ratios and the train/eval subsets.")
    train_size: int | None = opt(None, "Training queries: a seeded subset of that size (default: all).")
    eval_size: int | None = opt(None, "Evaluation queries: a seeded subset of that size (default: all).")
    cache_dir: str | None = opt(None, "HF datasets Arrow cache folder (default: the HF cache).")


def row_place(path: Path, row: int) -> str:
    """Where row ``row`` (0-based) of a data file is, for messages: ``line N``, or ``row N`` in Parquet."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return f"row {row + 1}"
    with path.open(newline="", encoding="utf-8") as fh:
        if suffix == ".csv":
            reader = csv.reader(fh)
            next(reader, None)  # the header
            start, i = reader.line_num + 1, 0
            for record in reader:
                if record:  # blank lines are skipped by the CSV builder too
                    if i == row:
                        return f"line {start}"
                    i += 1
                start = reader.line_num + 1
            return f"row {row + 1}"
        text = fh.read()
    if text.lstrip().startswith("["):  # a JSON array: no line per record
        return f"record {row + 1}"
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return f"line {lines[row]}" if row < len(lines) else f"row {row + 1}"


def _read(path: Path, cache_dir: str | None) -> Any:
    import datasets

    if not path.is_file():
        raise UserError(f"data file {path} not found")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"data file {path}: unsupported extension '{path.suffix}'; use one of {', '.join(BUILDERS)}"
        )
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:  # malformed JSON, mixed types, bad CSV: the file is at fault
        cause = err.__cause__ or err  # DatasetGenerationError wraps the parser's message
        raise UserError(
            f"could not read data file {path}: {type(cause).__name__}: {str(cause)[:300]}"
        ) from err


def _columns(path: Path, dataset: Any, cfg: UserTaskConfig, kind: str | None) -> dict[str, str | None]:
    """Which column holds each field; a required one missing is a ``UserError`` at the first row."""
    found: dict[str, str | None] = {}
    for field, defaults in FIELD_NAMES.items():
        named = cfg.fields.get(field) or (cfg.fields.get("answer") if field == "answers" else None)
        found[field] = named or next((c for c in defaults if c in dataset.column_names), None)
        required = field == "answers" or (field == "question" and kind != "caption")
        if (named and named not in dataset.column_names) or (required and found[field] is None):
            wanted = named or " or ".join(defaults)
            raise UserError(
                f"{path} {row_place(path, 0)}: missing required field '{wanted}' "
                f"(columns: {', '.join(dataset.column_names)}); rename it or map it under `fields:` in the task YAML"
            )
    return found


def _check_rows(path: Path, dataset: Any, columns: dict[str, str | None], kind: str | None) -> None:
    """A null or empty required (or given image) value is a ``UserError`` naming file, line, field."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for field in ("question", "answers", "image"):
        name = columns[field]
        if name is None or (field == "question" and kind == "caption"):
            continue
        col = dataset.data.column(name)
        bad = pc.is_null(col)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            bad = pc.or_(bad, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), True))
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            bad = pc.or_(bad, pc.fill_null(pc.equal(pc.list_value_length(col), 0), True))
        hits = pc.indices_nonzero(bad.combine_chunks() if hasattr(bad, "combine_chunks") else bad)
        if len(hits):
            row = hits[0].as_py()
            raise UserError(f"{path} {row_place(path, row)}: field '{name}' is missing or empty")


def _example_maker(
    path: Path, columns: dict[str, str | None], cfg: UserTaskConfig
) -> Callable[[dict], Example]:
    q, a, img, ident = columns["question"], columns["answers"], columns["image"], columns["id"]
    # a string in an `answers` column (CSV) holds several answers; an `answer` column holds one
    several = "answer" not in cfg.fields and a in (cfg.fields.get("answers"), "answers")

    def to_example(row: dict[str, Any]) -> Example:
        value = row[a]
        if isinstance(value, (list, tuple)):
            answers = tuple(str(v) for v in value)
        elif several and isinstance(value, str):
            answers = tuple(v.strip() for v in value.split(cfg.answers_separator))
        else:
            answers = (str(value),)
        image = row[img] if img is not None else None
        if isinstance(image, str):  # a path relative to the data file (else a decoded Image feature)
            file = (path.parent / image).expanduser()
            if not file.is_file():
                raise UserError(f"{path} {row_place(path, row['__row__'])}: image file {file} not found")
            image = str(file)
        ex_id = str(row[ident]) if ident else f"{path.stem}-{row['__row__']}"
        return Example(ex_id, str(row[q]) if q and row[q] is not None else "", answers, image)

    return to_example


def _check_layout(cfg: UserTaskConfig) -> None:
    errors = []
    if bool(cfg.files) == bool(cfg.file):
        errors.append("give either `files` (one file per split) or `file` (one file for all splits)")
    if cfg.file and bool(cfg.split_column) == bool(cfg.split_ratios):
        errors.append("`file` needs exactly one of `split_column` or `split_ratios`")
    for key, mapping in (("files", cfg.files), ("split_ratios", cfg.split_ratios)):
        errors += [
            f"'{key}': unknown split '{s}' (valid: {', '.join(SPLITS)})" for s in mapping if s not in SPLITS
        ]
        if mapping and "support" not in mapping:
            errors.append(f"'{key}' must include a support split (the demonstration pool)")
    ratios = list(cfg.split_ratios.values())
    if any(not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios) or sum(ratios) > 1 + 1e-9:
        errors.append(
            f"'split_ratios': got {cfg.split_ratios}, expected fractions in (0, 1] summing to at most 1"
        )
    errors += [
        f"'fields': unknown field '{f}' (valid: id, question, answers, answer, image)"
        for f in cfg.fields
        if f not in (*FIELD_NAMES, "answer")
    ]
    errors += [
        f"'{k}': got {v}, expected a positive integer"
        for k, v in (("train_size", cfg.train_size), ("eval_size", cfg.eval_size))
        if v is not None and v < 1
    ]
    if errors:
        raise ConfigError(f"user task {cfg.name}:\n  - " + "\n  - ".join(errors))


def _load_file(path: Path, cfg: UserTaskConfig) -> tuple[Any, dict[str, str | None]]:
    """A checked data file as a Dataset with a ``__row__`` column, and its field -> column map."""
    dataset = _read(path, cfg.cache_dir)
    if len(dataset) == 0:
        raise UserError(f"data file {path} has no rows")
    columns = _columns(path, dataset, cfg, cfg.kind)
    _check_rows(path, dataset, columns, cfg.kind)
    if columns["id"]:
        ids = [str(v) for v in column_values(dataset, columns["id"])]
        if len(set(ids)) < len(ids):
            seen: dict[str, int] = {}
            for row, ex_id in enumerate(ids):
                if ex_id in seen:
                    raise UserError(
                        f"{path} {row_place(path, row)}: id '{ex_id}' repeats {row_place(path, seen[ex_id])}"
                    )
                seen[ex_id] = row
    stamp = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:32]
    return dataset.add_column("__row__", list(range(len(dataset))), new_fingerprint=stamp), columns


def _split_rows(path: Path, dataset: Any, cfg: UserTaskConfig) -> dict[str, list[int]]:
    """Row indices of each split of a single-file task (by split column or seeded ratios)."""
    if cfg.split_column:
        if cfg.split_column not in dataset.column_names:
            raise UserError(f"{path} {row_place(path, 0)}: missing split column '{cfg.split_column}'")
        rows: dict[str, list[int]] = {}
        for row, value in enumerate(column_values(dataset, cfg.split_column)):
            if value not in SPLITS:
                raise UserError(
                    f"{path} {row_place(path, row)}: field '{cfg.split_column}' is {value!r}; expected one of {', '.join(SPLITS)}"
                )
            rows.setdefault(value, []).append(row)
        return rows
    order, start, rows = seeded_order(len(dataset), cfg.seed, "split_ratios"), 0.0, {}
    for split in SPLITS:
        if split in cfg.split_ratios:
            end = start + cfg.split_ratios[split]
            rows[split] = order[round(start * len(order)) : round(end * len(order))]
            start = end
    return rows


def _subset(view: ExampleView, size: int | None, seed: int, what: str, task: str) -> ExampleView:
    if size is None:
        return view
    if size > len(view):
        raise UserError(f"user task {task}: {what} is {size} but only {len(view)} examples are available")
    return view.select(seeded_order(len(view), seed, what)[:size])


def load_user_task(path: Path, data: dict[str, Any], **options: Any) -> Task:
    """A ``Task`` from a user YAML (already read into ``data``); options override its keys.

    Every data file is read and checked at once: a row missing a required field is a ``UserError``
    naming the file, the line and the field; unknown YAML keys are one ``ConfigError``.
    """
    from pipeline.tasks import task_spec

    cfg = load_config(UserTaskConfig, {"name": path.stem, **data}, **options)
    _check_layout(cfg)
    views: dict[str, ExampleView] = {}
    has_image = False
    for split, rel in (cfg.files or {"all": cfg.file}).items():
        file = (path.parent / rel).expanduser()
        dataset, columns = _load_file(file, cfg)
        has_image |= columns["image"] is not None
        views[split] = ExampleView(
            dataset,
            _example_maker(file, columns, cfg),
            columns["id"] or "__row__",
            "" if columns["id"] else f"{file.stem}-",
        )
    if cfg.file:
        whole = views.pop("all")
        views = {
            split: whole.select(rows) for split, rows in _split_rows(file, whole.dataset, cfg).items() if rows
        }
    if "support" not in views:
        raise UserError(f"user task {cfg.name}: the support split is empty")
    views["train"] = _subset(
        views.get("train", views["support"]), cfg.train_size, cfg.seed, "train_size", cfg.name
    )
    if "eval" in views:
        views["eval"] = _subset(views["eval"], cfg.eval_size, cfg.seed, "eval_size", cfg.name)
    for view in views.values():
        check_first_images(view)
    kind = cfg.kind or ("vqa" if has_image else "text")
    prompt = cfg.prompt or DEFAULT_PROMPTS[kind]
    spec = task_spec(
        cfg.name, kind, cfg.metric or DEFAULT_METRICS[kind], prompt, cfg.answer, cfg.max_new_tokens
    )
    return Task(spec, {split: (lambda view=view: view) for split, view in views.items()})
