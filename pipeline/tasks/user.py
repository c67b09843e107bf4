"""``loader: files`` (the default): a task YAML naming local JSONL / JSON / CSV / Parquet files, read
through ``datasets``.

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

Or a Hugging Face dataset instead of files (``hub``), its columns mapped as a built-in task's
``hub`` blocks map them (``pipeline.tasks.hub``; ``id`` and ``answers`` required, ``question`` unless
captions, ``image`` an Image column)::

    hub:
      id: someone/my-vqa        # revision: a tag or commit (recommended: pins the data); name: a config
      split: train
      columns: {id: qid, question: question, answers: answers, image: image}
    split_ratios: {support: 0.8, eval: 0.2}     # or split_column; or one block per split:
    # hub: {support: {id: ..., split: train, columns: ...}, eval: {id: ..., split: validation, ...}}

Its rows are checked as a data file's are (errors name the dataset, the split, the row, the column and
the YAML key mapping it). Without network only a copy in the HF cache loads (else a one-line error).

Columns: ``question`` or ``input``; ``answers`` (a list, or in CSV one string split on
``answers_separator``) or ``answer`` (a string); optional ``image`` (file path) and ``id``. Without a
``train`` split, training queries are the support split (or ``train_size`` of it, seeded).

Values are text. A number in a question, answer or id is accepted as the text it spells: integers
exactly (``4`` -> ``"4"``), other numbers in their shortest form (``2.50`` -> ``"2.5"``, ``4.0`` ->
``"4"``); quote a number to keep its exact spelling. A JSON object, array or boolean is refused
(file, line and field named) instead of becoming Python's spelling of it (``"{'a': 1}"``); the only
list accepted is ``answers`` as a list of strings (or numbers). CSV cells are always read as text,
so ``007`` stays ``007``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, UserError
from pipeline.tasks.base import SPLITS, Example
from pipeline.tasks.faults import json_fault, json_kind, read_text
from pipeline.tasks.hub import check_source, hub_view, load_hub_dataset
from pipeline.tasks.official import ExampleView, check_first_images, column_values, seeded_order

if TYPE_CHECKING:
    from pipeline.tasks import TaskConfig

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXPECTED_CONTENT = {
    "json": "one JSON object per line (JSON Lines), or a JSON array of objects",
    "csv": "a header line naming the columns, then one row per line",
    "parquet": "a Parquet table with one row per example",
}
FIELD_NAMES = {
    "id": ("id",),
    "question": ("question", "input"),
    "answers": ("answers", "answer"),
    "image": ("image",),
}
@dataclass(frozen=True)
class Rows:
    """Where a dataset's rows come from, for messages: a data file (rows named by their line) or a split of
    a hub dataset (rows by number; columns named with the YAML key that maps them, ``columns_key``)."""

    label: str
    path: Path | None = None
    columns_key: str = ""

    def place(self, row: int) -> str:
        return row_place(self.path, row) if self.path is not None else f"row {row + 1}"

    def at(self, row: int) -> str:
        return f"{self.label} {self.place(row)}"

    def field(self, field: str, name: str) -> str:
        """A column as messages name it: a data file's field, or a hub column with its YAML key."""
        if self.path is not None:
            return f"field '{name}'"
        return f"column '{name}' ({'split_column' if field == 'split_column' else f'{self.columns_key}.{field}'})"

    def fix(self, field: str) -> str:
        if self.path is not None:
            return "write the value as a JSON string (quoted) or map another column under `fields:` in the task YAML"
        return f"map another column under {self.columns_key}.{field} in the task YAML"


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


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the ``datasets`` logger: its own "Failed to load JSON ..." lines would precede ours."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _csv_text_features(path: Path) -> Any:
    """Every CSV column typed as text, so that cells keep their spelling (``007``, ``1.50``).

    None (let pandas infer) when the header has an empty name, which pandas renames itself.
    """
    import datasets

    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError:
        read_text(path)  # raises the UserError naming the line
        raise
    if not header or not any(name.strip() for name in header):
        raise UserError(f"data file {path} has no rows: {EXPECTED_CONTENT['csv']} expected")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(
            f"{path} line 1: column(s) {', '.join(map(repr, repeated))} named twice in the header; "
            "give every column its own name"
        )
    if any(name == "" for name in header):
        return None
    return datasets.Features({name: datasets.Value("string") for name in header})


def _read_error(path: Path, builder: str, err: BaseException) -> UserError:
    """The one-line ``UserError`` for a data file that ``datasets`` could not read."""
    cause = err.__cause__ or err  # DatasetGenerationError wraps the parser's message
    text = str(cause).strip()
    fault = json_fault(path) if builder == "json" else None
    if fault == "empty" or "corresponds to no data" in text:
        return UserError(f"data file {path} has no rows: {EXPECTED_CONTENT[builder]} expected")
    if fault is not None:
        return UserError(f"{path} {fault}; fix it there")
    first_line = text.splitlines()[0][:300] if text else ""
    return UserError(
        f"could not read data file {path}: {type(cause).__name__}: {first_line} "
        f"(expected {EXPECTED_CONTENT[builder]}); fix or re-export the file"
    )


def _read(path: Path, cache_dir: str | None) -> Any:
    import datasets

    if not path.is_file():
        raise UserError(f"data file {path} not found")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"data file {path}: unsupported extension '{path.suffix}'; use one of {', '.join(BUILDERS)}"
        )
    if path.stat().st_size == 0:
        raise UserError(
            f"data file {path} has no rows (the file is empty): {EXPECTED_CONTENT[builder]} expected"
        )
    options: dict[str, Any] = {}
    if builder == "csv":
        options["features"] = _csv_text_features(path)
    try:
        with _quiet_datasets():
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir, **options
            )
    except Exception as err:  # malformed JSON, an empty file, bad CSV, not Parquet: the file is at fault
        raise _read_error(path, builder, err) from err


def _columns(path: Path, dataset: Any, cfg: TaskConfig, kind: str | None) -> dict[str, str | None]:
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


def _check_rows(rows: Rows, dataset: Any, columns: dict[str, str | None], kind: str | None) -> None:
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
        elif pa.types.is_floating(col.type):  # NaN in a Parquet float column: no value either
            bad = pc.or_(bad, pc.fill_null(pc.is_nan(col), True))
        hits = pc.indices_nonzero(bad.combine_chunks() if hasattr(bad, "combine_chunks") else bad)
        if len(hits):
            row = hits[0].as_py()
            raise UserError(f"{rows.at(row)}: {rows.field(field, name)} is missing or empty")


TEXT_DTYPES = ("string", "large_string")
NUMBER_DTYPE_PREFIXES = ("int", "uint", "float", "double")
EXPECTED_VALUE = {
    "question": "text (a string; a number is read as text)",
    "answers": "a string or a list of strings",
    "id": "a string or an integer",
    "image": "an image file path (a string)",
}


def as_text(value: Any) -> str:
    """A question/answer value as text: strings as they are, numbers in their shortest spelling.

    Integers spell exactly (``4``); a float that holds an integer drops its ``.0`` (a JSON column
    that mixes ``4`` and ``2.5`` is read as floats, and ``4`` must stay ``"4"``); other floats use
    Python's shortest round-trip form. Quote a number in the data file to keep another spelling.
    """
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def _simple(feature: Any, field: str) -> bool:
    """True when every value of a column with this ``datasets`` feature is acceptable for ``field``."""
    import datasets

    if field == "image":
        return isinstance(feature, datasets.Image) or (
            isinstance(feature, datasets.Value) and feature.dtype in TEXT_DTYPES
        )
    if isinstance(feature, datasets.Value):
        scalar = feature.dtype in TEXT_DTYPES or (
            feature.dtype.startswith(NUMBER_DTYPE_PREFIXES)
            and not (field == "id" and "float" in feature.dtype)
        )
        return scalar
    if field == "answers" and isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        return _simple(feature.feature, "question")
    return False


def _value_problem(value: Any, field: str) -> str | None:
    """What is wrong with one (decoded) value of ``field``, or None when it is acceptable."""
    if value is None:
        return None  # a missing value is reported by _check_rows, with the same wording as before
    if field == "image":
        return None if isinstance(value, str) else f"{json_kind(value)} ({_preview(value)})"
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        if field == "id" and isinstance(value, float):
            return f"a fractional number ({value!r})"
        return None
    if field == "answers" and isinstance(value, list):
        for item in value:
            if item is None or isinstance(item, bool) or not isinstance(item, (str, int, float)):
                return f"a list holding {json_kind(item)} ({_preview(value)})"
        return None
    return f"{json_kind(value)} ({_preview(value)})"


def _preview(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _decoded_column(dataset: Any, name: str) -> list[Any]:
    return dataset.select_columns([name])[:][name]


def _check_list_nulls(rows: Rows, dataset: Any, name: str) -> None:
    """A null inside a list of answers (``["x", null]``) would become the answer "None"."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = dataset.data.column(name).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return
    nulls = pc.indices_nonzero(pc.is_null(pc.list_flatten(col)))
    if len(nulls):
        row = pc.list_parent_indices(col)[nulls[0].as_py()].as_py()
        value = col[row].as_py()
        raise UserError(
            f"{rows.at(row)}: {rows.field('answers', name)} is a list holding null ({_preview(value)}); expected "
            f"{EXPECTED_VALUE['answers']}; remove the null or write it as a string"
        )


def _check_types(rows: Rows, dataset: Any, columns: dict[str, str | None], kind: str | None) -> None:
    """Refuse an object, array or boolean where text is expected, naming the file, line and field.

    Columns whose type is plain text or numbers (checked on the schema) are not read row by row;
    only a column of another type (a JSON column mixing types, a struct, a list) is.
    """
    import datasets

    for field in ("id", "question", "answers", "image"):
        name = columns[field]
        if name is None or (field == "question" and kind == "caption"):
            continue
        feature = dataset.features[name]
        if _simple(feature, field):
            _check_list_nulls(rows, dataset, name)
            continue
        values = _decoded_column(dataset, name)
        mixed_ids = field == "id" and isinstance(feature, datasets.Json)
        for row, value in enumerate(values):
            if field != "id" and (
                value is None or value == [] or (isinstance(value, str) and not value.strip())
            ):
                raise UserError(f"{rows.at(row)}: {rows.field(field, name)} is missing or empty")
            if mixed_ids and _value_problem(value, field) is None and not isinstance(value, str):
                raise UserError(
                    f"{rows.at(row)}: {rows.field(field, name)} is {json_kind(value)} ({_preview(value)}) "
                    "while other rows hold text; give every id the same type (e.g. quote every id)"
                )
            problem = _value_problem(value, field)
            if problem is not None:
                raise UserError(
                    f"{rows.at(row)}: {rows.field(field, name)} is {problem}; expected "
                    f"{EXPECTED_VALUE[field]}; {rows.fix(field)}"
                )


def _example_maker(
    path: Path, columns: dict[str, str | None], cfg: TaskConfig
) -> Callable[[dict], Example]:
    q, a, img, ident = columns["question"], columns["answers"], columns["image"], columns["id"]
    # a string in an `answers` column (CSV) holds several answers; an `answer` column holds one
    several = "answer" not in cfg.fields and a in (cfg.fields.get("answers"), "answers")

    def to_example(row: dict[str, Any]) -> Example:
        value = row[a]
        if isinstance(value, (list, tuple)):
            answers = tuple(as_text(v) for v in value)
        elif several and isinstance(value, str):
            answers = tuple(v.strip() for v in value.split(cfg.answers_separator))
        else:
            answers = (as_text(value),)
        image = row[img] if img is not None else None
        if isinstance(image, str):  # a path relative to the data file (else a decoded Image feature)
            file = (path.parent / image).expanduser()
            if not file.is_file():
                raise UserError(f"{path} {row_place(path, row['__row__'])}: image file {file} not found")
            image = str(file)
        ex_id = str(row[ident]) if ident else f"{path.stem}-{row['__row__']}"
        return Example(ex_id, as_text(row[q]) if q and row[q] is not None else "", answers, image)

    return to_example


def _hub_sources(hub: Any) -> dict[str, Any]:
    """A user task's ``hub`` blocks by split; one dataset split (divided by ratios or a column) is ``all``."""
    if isinstance(hub, dict) and hub and set(hub) <= set(SPLITS):
        return dict(hub)
    return {"all": hub}


def _hub_key(which: str) -> str:
    return "hub" if which == "all" else f"hub.{which}"


def _hub_errors(cfg: TaskConfig) -> list[str]:
    """Problems with a user task's ``hub`` section: each block as ``hub.check_source`` checks a built-in
    task's, plus what a user task's rows need (a question column unless captions, text-valued keys)."""
    sources = _hub_sources(cfg.hub)
    errors = [
        e for which, source in sources.items() for e in check_source(cfg.name, "" if which == "all" else which, source)
    ]
    if "all" not in sources and "support" not in sources:
        errors.append("'hub' must include a support split (the demonstration pool)")
    if "all" in sources and bool(cfg.split_column) == bool(cfg.split_ratios):
        errors.append(
            "`hub` with one dataset split needs exactly one of `split_column` or `split_ratios` "
            "(or give one block per split: hub.support, hub.eval, hub.train)"
        )
    if "all" not in sources and (cfg.split_column or cfg.split_ratios):
        errors.append("`split_column` / `split_ratios` divide one dataset split; `hub` gives one block per split")
    if cfg.fields:
        errors.append("`fields` maps the columns of data files; map a hub dataset's columns under `columns:` in its `hub` block")
    for which, source in sources.items():
        if not isinstance(source, dict):
            continue
        key = _hub_key(which)
        errors += [
            f"{key}.{k}: got {source[k]!r}, expected text (quote it in the YAML)"
            for k in ("id", "name", "revision")
            if k in source and source[k] is not None and (not isinstance(source[k], str) or not source[k].strip())
        ]
        columns = source.get("columns")
        if not isinstance(columns, dict):
            continue
        errors += [
            f"{key}.columns.{f}: got {c!r}, expected a column name (a string)"
            for f, c in columns.items()
            if c is not None and (not isinstance(c, str) or not c)
        ]
        if cfg.kind != "caption" and not columns.get("question"):
            errors.append(f"{key}.columns.question is missing (only a caption task has no question)")
        if source.get("answer_key") is not None and not isinstance(source["answer_key"], str):
            errors.append(f"{key}.answer_key: got {source['answer_key']!r}, expected a key name (a string)")
    return errors


def _check_layout(cfg: TaskConfig) -> None:
    """Every problem of the task's data keys at once, on one line."""
    errors = []
    if sum(map(bool, (cfg.files, cfg.file, cfg.hub))) != 1:
        errors.append(
            "give either `files` (one file per split), `file` (one file for all splits) or `hub` "
            "(a Hugging Face dataset)"
        )
    if cfg.file and bool(cfg.split_column) == bool(cfg.split_ratios):
        errors.append("`file` needs exactly one of `split_column` or `split_ratios`")
    if cfg.hub:
        errors += _hub_errors(cfg)
    for key, mapping in (("files", cfg.files), ("split_ratios", cfg.split_ratios)):
        errors += [
            f"'{key}': unknown split '{s}' (valid: {', '.join(SPLITS)})" for s in mapping if s not in SPLITS
        ]
        if mapping and "support" not in mapping:
            errors.append(f"'{key}' must include a support split (the demonstration pool)")
    errors += [
        f"'files': {split}: got {rel!r}, expected a file path (a string)"
        for split, rel in cfg.files.items()
        if not isinstance(rel, str) or not rel.strip()
    ]
    errors += [
        f"'fields': {field}: got {column!r}, expected a column name (a string)"
        for field, column in cfg.fields.items()
        if not isinstance(column, str) or not column
    ]
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
    if errors:
        raise ConfigError(f"user task {cfg.name}: " + "; ".join(errors))


def _check_utf8(path: Path, dataset: Any) -> None:
    """The JSON reader keeps bytes that are not UTF-8 in its strings; name the line holding them."""
    import pyarrow as pa

    try:
        dataset.data.table.validate(full=True)
    except pa.ArrowInvalid as err:
        read_text(path)  # raises the UserError naming the line of the first bad byte
        raise UserError(f"data file {path}: {str(err).splitlines()[0]}; save it with UTF-8 encoding") from err


def _check_unique_ids(rows: Rows, dataset: Any, column: str) -> None:
    ids = [str(v) for v in column_values(dataset, column)]
    if len(set(ids)) < len(ids):
        seen: dict[str, int] = {}
        for row, ex_id in enumerate(ids):
            if ex_id in seen:
                raise UserError(f"{rows.at(row)}: id '{ex_id}' repeats {rows.place(seen[ex_id])}")
            seen[ex_id] = row


def _load_file(path: Path, cfg: TaskConfig) -> tuple[Any, dict[str, str | None]]:
    """A checked data file as a Dataset with a ``__row__`` column, and its field -> column map."""
    dataset = _read(path, cfg.cache_dir)
    _check_utf8(path, dataset)
    if len(dataset) == 0:
        raise UserError(f"data file {path} has no rows")
    columns = _columns(path, dataset, cfg, cfg.kind)
    rows = Rows(str(path), path)
    _check_types(rows, dataset, columns, cfg.kind)
    _check_rows(rows, dataset, columns, cfg.kind)
    if columns["id"]:
        _check_unique_ids(rows, dataset, columns["id"])
    stamp = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:32]
    return dataset.add_column("__row__", list(range(len(dataset))), new_fingerprint=stamp), columns


def _check_answer_key(rows: Rows, dataset: Any, name: str, answer_key: str) -> None:
    """Answers as mappings (VQAv2's ``{"answer": ...}``): a list of them, each with a text ``answer_key``."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = dataset.features[name]
    inner = getattr(feature, "feature", None)
    if not (
        isinstance(feature, (datasets.List, datasets.LargeList))
        and isinstance(inner, dict)
        and answer_key in inner
        and _simple(inner[answer_key], "question")
    ):
        raise UserError(
            f"{rows.label}: {rows.field('answers', name)} is {feature}; answer_key '{answer_key}' needs a list "
            f"of mappings whose '{answer_key}' is text; fix {rows.columns_key.rpartition('.')[0]}.answer_key "
            f"or {rows.columns_key}.answers in the task YAML"
        )
    col = dataset.data.column(name).combine_chunks()
    values = pc.struct_field(pc.list_flatten(col), answer_key)
    bad = pc.is_null(values)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        bad = pc.or_(bad, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True))
    hits = pc.indices_nonzero(bad)
    if len(hits):
        row = pc.list_parent_indices(col)[hits[0].as_py()].as_py()
        raise UserError(
            f"{rows.at(row)}: {rows.field('answers', name)} holds an answer whose '{answer_key}' is missing or empty"
        )


def _load_hub(which: str, source: dict[str, Any], cfg: TaskConfig) -> tuple[Any, Rows]:
    """One checked split of a hub dataset (``hub.load_hub_dataset``), the rows' checks those of a data file.

    The dataset's fingerprint is set from its id, config, split and revision (with the fingerprint
    ``datasets`` gave the downloaded files), as a data file's is from its path and modification time.
    """
    import datasets

    key = _hub_key(which)
    dataset = load_hub_dataset(source, cfg.cache_dir, cfg.name)
    split = "+".join(source["split"]) if isinstance(source["split"], list) else source["split"]
    revision = f" revision '{source['revision']}'" if source.get("revision") else ""
    rows = Rows(f"HF dataset '{source['id']}' split '{split}'{revision}", columns_key=f"{key}.columns")
    if len(dataset) == 0:
        raise UserError(f"{rows.label} has no rows; fix {key}.split or {key}.id in the task YAML")
    mapped = source["columns"]
    for field, name in mapped.items():
        if name is not None and name not in dataset.column_names:
            raise UserError(
                f"{rows.label} has no column '{name}' (named by {key}.columns.{field}); its columns: "
                f"{', '.join(dataset.column_names)}; fix {key}.columns.{field} in the task YAML"
            )
    columns = {field: mapped.get(field) for field in FIELD_NAMES}
    image = columns["image"]
    if image is not None and not isinstance(dataset.features[image], datasets.Image):
        raise UserError(
            f"{rows.label}: {rows.field('image', image)} is {dataset.features[image]}; expected an Image "
            f"column (for image files under the data root give {key}.image_path, a template over the row)"
        )
    answer_key = source.get("answer_key")
    if source.get("one_per_question"):  # lists of questions and answers: hub_view checks them pairwise
        columns = {**columns, "question": None, "answers": None}
    elif answer_key:
        _check_answer_key(rows, dataset, columns["answers"], answer_key)
    elif isinstance(getattr(dataset.features[columns["answers"]], "feature", None), dict):
        keys = ", ".join(dataset.features[columns["answers"]].feature)
        raise UserError(
            f"{rows.label}: {rows.field('answers', columns['answers'])} is a list of mappings (keys: {keys}); "
            f"give {key}.answer_key, the key holding each answer's text"
        )
    _check_types(rows, dataset, {**columns, "answers": None} if answer_key else columns, cfg.kind)
    _check_rows(rows, dataset, columns, cfg.kind)
    _check_unique_ids(rows, dataset, columns["id"])
    stamp = json.dumps([source["id"], source.get("name"), source["split"], source.get("revision"),
                        getattr(dataset, "_fingerprint", None)])
    fingerprint = hashlib.sha256(stamp.encode()).hexdigest()[:32]
    return dataset.add_column("__row__", list(range(len(dataset))), new_fingerprint=fingerprint), rows


def _split_rows(rows: Rows, dataset: Any, cfg: TaskConfig) -> dict[str, list[int]]:
    """Row indices of each split of a single-file task (by split column or seeded ratios)."""
    if cfg.split_column:
        if cfg.split_column not in dataset.column_names:
            raise UserError(f"{rows.at(0)}: missing split column '{cfg.split_column}'")
        split_rows: dict[str, list[int]] = {}
        for row, value in enumerate(column_values(dataset, cfg.split_column)):
            if value not in SPLITS:
                raise UserError(
                    f"{rows.at(row)}: {rows.field('split_column', cfg.split_column)} is {value!r}; "
                    f"expected one of {', '.join(SPLITS)}"
                )
            split_rows.setdefault(value, []).append(row)
        return split_rows
    order, start, split_rows = seeded_order(len(dataset), cfg.seed, "split_ratios"), 0.0, {}
    for split in SPLITS:
        if split in cfg.split_ratios:
            end = start + cfg.split_ratios[split]
            split_rows[split] = order[round(start * len(order)) : round(end * len(order))]
            start = end
    return split_rows


def _split_sizes(views: dict[str, ExampleView]) -> str:
    """``support 6, train 0, eval 2``: every split's size, for messages about splits."""
    return ", ".join(f"{split} {len(views[split]) if split in views else 0}" for split in SPLITS)


def _subset(
    views: dict[str, ExampleView], split: str, size: int | None, seed: int, what: str, task: str
) -> ExampleView:
    view = views[split]
    if size is None:
        return view
    if size > len(view):
        raise UserError(
            f"user task {task}: {what} is {size} but the {split} split has only {len(view)} examples "
            f"(split sizes: {_split_sizes(views)}); lower {what} or add rows"
        )
    return view.select(seeded_order(len(view), seed, what)[:size])


def _check_ratio_splits(rows: Rows, views: dict[str, ExampleView], cfg: TaskConfig, total: int) -> None:
    """A split given a ratio that rounds to no rows is an error (it would silently disappear)."""
    empty = [split for split in cfg.split_ratios if split not in views]
    if empty:
        raise UserError(
            f"user task {cfg.name}: split_ratios {cfg.split_ratios} leave{'s' if len(empty) == 1 else ''} "
            f"{' and '.join(empty)} with no rows of the {total} in {rows.label} (split sizes: {_split_sizes(views)}); "
            "raise those ratios or add rows"
        )


def _file_views(path: Path, cfg: TaskConfig) -> tuple[dict[str, ExampleView], dict[str, Rows], bool]:
    """A view per data file (``all`` for one file of every split), where its rows come from, and whether
    they have images."""
    views: dict[str, ExampleView] = {}
    origins: dict[str, Rows] = {}
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
        origins[split] = Rows(str(file), file)
    return views, origins, has_image


def _hub_views(cfg: TaskConfig) -> tuple[dict[str, ExampleView], dict[str, Rows], bool]:
    """A view per ``hub`` block (``all`` for one dataset split of every split), as ``_file_views``."""
    views: dict[str, ExampleView] = {}
    origins: dict[str, Rows] = {}
    has_image = False
    for which, source in _hub_sources(cfg.hub).items():
        dataset, origins[which] = _load_hub(which, source, cfg)
        has_image |= bool(source["columns"].get("image") or source.get("image_path"))
        views[which] = hub_view(dataset, source, cfg.data_root, cfg.name)
    return views, origins, has_image


def file_loaders(path: Path, cfg: TaskConfig) -> tuple[dict[str, Callable[[], ExampleView]], bool]:
    """The split loaders of a ``loader: files`` task YAML at ``path``, and whether its rows have images.

    Every data file (or hub dataset split) is read and checked at once: a row missing a required field,
    or holding an object where text is expected, is a ``UserError`` naming the file, the line and the
    field (a hub dataset: its id, split, row, column and the YAML key mapping it); an unreadable file is
    a ``UserError`` naming the file (and the line, for JSON). Errors about splits give every split's size.
    """
    _check_layout(cfg)
    views, origins, has_image = _hub_views(cfg) if cfg.hub else _file_views(path, cfg)
    if "all" in views:  # one file or dataset split for every split: by split column or ratios
        whole, rows = views.pop("all"), origins["all"]
        views = {
            split: whole.select(indices)
            for split, indices in _split_rows(rows, whole.dataset, cfg).items()
            if indices
        }
        if cfg.split_ratios:
            _check_ratio_splits(rows, views, cfg, len(whole))
    if "support" not in views:
        where = f" (no row of {origins['all'].label} has {cfg.split_column} = support)" if cfg.split_column else ""
        raise UserError(
            f"user task {cfg.name}: the support split is empty{where} (split sizes: {_split_sizes(views)}); "
            "the support split is the demonstration pool and needs rows"
        )
    views["train"] = _subset(
        views, "train" if "train" in views else "support", cfg.train_size, cfg.seed, "train_size", cfg.name
    )
    if "eval" in views:
        views["eval"] = _subset(views, "eval", cfg.eval_size, cfg.seed, "eval_size", cfg.name)
    if cfg.support_size is not None:
        views["support"] = _subset(views, "support", cfg.support_size, cfg.seed, "support_size", cfg.name)
    for view in views.values():
        check_first_images(view)
    return {split: (lambda view=view: view) for split, view in views.items()}, has_image
