"""MME and SEED-Bench (image part): ``loader: mme`` / ``loader: seed_bench``, from the official release
files under the data root or from the HF hub, and the benchmarks' answer parsing and per-group scores.

Both benchmarks ship one split, so demonstrations and training queries cannot come from a split of
their own. The policy here (``split_ratios`` in the task YAML): the *images* are partitioned once,
seeded and per stratum (MME subtask, SEED question type), into ``support`` (the demonstration pool),
optionally ``train`` (training queries; without it they are the support split, as for the other
tasks) and ``eval``; every question follows its image. No evaluated image, hence no evaluated
question, is ever in the support pool or the training queries, and the two questions of an MME image
stay together (acc+ needs both). The evaluated part is a seeded sample of images stratified like the
benchmark, so the scores estimate the full benchmark's rather than equal them. (Within the support
part, a training query's demonstrations exclude the query itself only, as for every task: the other
question of its MME image may be one of them.)

Local layouts (under the data root, paths in the YAML's ``official``):

* MME, ``official.root`` = the ``MME_Benchmark_release_version`` folder (or its ``MME_Benchmark``
  subfolder): one folder per subtask holding either the images with one ``<image>.txt`` each beside
  them, or ``images/`` + ``questions_answers_YN/`` (artwork, celebrity, landmark, posters, scene).
  A ``.txt`` line is ``question<TAB>Yes|No``; a line ``image<TAB>question<TAB>Yes|No`` (the eval
  tool's per-subtask files) names its image itself.
* SEED-Bench, ``official.questions`` = ``SEED-Bench.json`` (its ``questions`` list) and
  ``official.images`` = a template over a question's fields, e.g. ``seed_bench/SEED-Bench-image/{data_id}``.

Hub (``source: hub``): ``hub: {id, split, name?, revision?}`` of ``lmms-lab/MME`` (question_id = the
image, image, question, answer, category) or ``lmms-lab/SEED-Bench`` (answer, choice_a..choice_d,
data_id, data_type, question, question_id, question_type_id, image: a list of images); only the rows
with ``data_type == "image"`` are kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, UserError
from pipeline.metrics import MME_COGNITION, MME_PERCEPTION, mme_parse, mme_scores, seed_accuracy, seed_letter
from pipeline.tasks.base import SPLITS, Example
from pipeline.tasks.faults import read_text
from pipeline.tasks.official import (
    ExampleView,
    check_first_images,
    column_values,
    load_json_records,
    seeded_order,
)

BENCHMARK_LOADERS = ("mme", "seed_bench")
"""The ``loader:`` names this module reads."""
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION
MME_SPLIT_FOLDERS = ("images", "questions_answers_YN")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")
SEED_IMAGE_TYPES = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding",
}
"""SEED-Bench's image dimensions: ``question_type_id`` -> name (SEED-Bench.json's ``question_type``;
10-12 are the video dimensions, not read here)."""
SEED_OPTIONS = ("A", "B", "C", "D")


# --- answer parsing (the tasks' ``postprocess`` hooks) --------------------------------------------------
def _first_line(generated: str) -> str:
    return generated.strip().split("\n", 1)[0].strip()


def mme_prediction(generated: str) -> str:
    """The prediction of an MME answer: "yes" / "no" as the official eval tool parses the (stripped)
    response (``pipeline.metrics.mme_parse``), else the response itself (scored wrong)."""
    text = _first_line(generated)
    parsed = mme_parse(text)
    return parsed if parsed in ("yes", "no") else text


def seed_prediction(generated: str) -> str:
    """The prediction of a SEED-Bench answer: the option letter ``seed_letter`` finds, else the response
    itself (no letter or an ambiguous one: scored wrong)."""
    text = _first_line(generated)
    return seed_letter(text) or text


def seed_question(question: str, choices: Sequence[str]) -> str:
    """The question with its options listed, as LLaVA's SEED-Bench prompt: ``question\\nA. ...\\nB. ...``."""
    return "\n".join([question.strip(), *(f"{letter}. {str(c).strip()}" for letter, c in zip(SEED_OPTIONS, choices,
                                                                                            strict=True))])


# --- the single-split policy -----------------------------------------------------------------------
def check_ratios(cfg: Any) -> dict[str, float]:
    """``split_ratios`` of a benchmark task: support and eval (train optional), fractions in [0, 1]
    (support > 0) summing to at most 1; a ``ConfigError`` otherwise."""
    ratios = dict(cfg.split_ratios)
    errors = [f"unknown split {k!r} (valid: {', '.join(SPLITS)})" for k in ratios if k not in SPLITS]
    errors += [f"{k} is missing" for k in ("support", "eval") if k not in ratios]
    bad = {k: v for k, v in ratios.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1}
    errors += [f"{k}: got {v!r}, expected a fraction in [0, 1]" for k, v in bad.items()]
    if not bad and sum(ratios.values()) > 1 + 1e-9:
        errors.append(f"the fractions sum to {sum(ratios.values()):g}, more than 1")
    if not bad and ratios.get("support", 1) <= 0:
        errors.append("support must be > 0 (the demonstration pool)")
    if errors:
        raise ConfigError(f"task {cfg.name}: invalid 'split_ratios' {ratios} (the benchmark has one split: its "
                          "images are divided between support, train and eval):\n  - " + "\n  - ".join(errors))
    return ratios


def partition(images: Sequence[str], strata: Sequence[Any], ratios: dict[str, float], seed: int,
              salt: str) -> dict[str, list[int]]:
    """Row indices per split: the distinct images of each stratum, sorted then shuffled by (seed, salt,
    stratum), are cut by ``ratios`` (support, then train, then eval; rounded, at least one support image
    per stratum); each split lists its images in one seeded order across strata, an image's rows
    together in source order. An image's stratum is that of its first row."""
    rows_of: dict[str, list[int]] = {}
    stratum_of: dict[str, Any] = {}
    for i, (image, stratum) in enumerate(zip(images, strata, strict=True)):
        rows_of.setdefault(image, []).append(i)
        stratum_of.setdefault(image, stratum)
    by_stratum: dict[str, list[str]] = {}
    for image, stratum in stratum_of.items():
        by_stratum.setdefault(str(stratum), []).append(image)
    picked: dict[str, list[str]] = {split: [] for split in ratios}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum])
        members = [members[j] for j in seeded_order(len(members), seed, f"{salt}:{stratum}")]
        start = 0
        for split in ("support", "train", "eval"):
            if split not in ratios:
                continue
            count = max(1, round(ratios[split] * len(members))) if split == "support" else round(
                ratios[split] * len(members))
            picked[split] += members[start : start + count]
            start += count
    out = {}
    for split, chosen in picked.items():
        chosen = sorted(chosen)
        chosen = [chosen[j] for j in seeded_order(len(chosen), seed, f"{salt}:{split}")]
        out[split] = [i for image in chosen for i in rows_of[image]]
    return out


def split_views(read: Callable[[], tuple[ExampleView, Sequence[str], Sequence[Any]]], cfg: Any
                ) -> dict[str, Callable[[], ExampleView]]:
    """support / train / eval loaders over one benchmark source; ``read()`` gives (view, image of each row,
    stratum of each row) and runs once, at the first split asked for. ``*_size`` keeps the first N
    questions of a split (its order is already a seeded order of images)."""
    ratios = check_ratios(cfg)
    sizes = {"support": cfg.support_size, "train": cfg.train_size, "eval": cfg.eval_size}

    @functools.cache
    def parts() -> tuple[ExampleView, dict[str, list[int]]]:
        view, images, strata = read()
        rows = partition(images, strata, ratios, cfg.seed, cfg.loader)  # a renamed copy: the same parts
        rows.setdefault("train", rows["support"])
        return view, rows

    def take(split: str) -> ExampleView:
        view, rows = parts()
        rows, size = rows[split], sizes[split]
        if size is not None:
            if size > len(rows):
                raise UserError(f"task {cfg.name}: {split}_size asks for {size} questions but its {split} part "
                                f"({ratios.get(split, ratios['support']):g} of the images) has {len(rows)}; "
                                f"pass {split}_size <= {len(rows)} or change split_ratios")
            rows = rows[:size]
        if not rows:
            raise UserError(f"task {cfg.name}: the {split} part is empty ({ratios.get(split, 0):g} of the "
                            "images); raise its split_ratios fraction")
        return check_first_images(view.select(rows))

    return {split: (lambda split=split: take(split)) for split in SPLITS}


# --- MME ---------------------------------------------------------------------------------------------
def _mme_root(root: Path) -> Path:
    """The folder holding the subtask folders: ``root`` or its ``MME_Benchmark`` subfolder."""
    if any((root / s).is_dir() for s in MME_SUBTASKS):
        return root
    nested = root / "MME_Benchmark"
    if any((nested / s).is_dir() for s in MME_SUBTASKS):
        return nested
    raise UserError(f"MME: no subtask folder ({', '.join(MME_SUBTASKS[:3])}, ...) in {root}; point "
                    "official.root (under the data root) at the MME_Benchmark_release_version folder, or load "
                    "it from the hub with source=hub")


def _find_image(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def _mme_answer(value: str, where: str) -> str:
    answer = value.strip()
    if answer.lower() not in ("yes", "no"):
        raise UserError(f"MME: {where}: answer {value!r}; expected Yes or No")
    return answer


def read_mme_folder(root: Path) -> list[dict[str, Any]]:
    """Rows ``{example_id, question, answer, subtask, image_id, image}`` of the official MME release."""
    base = _mme_root(root)
    rows: list[dict[str, Any]] = []
    for subtask in MME_SUBTASKS:
        folder = base / subtask
        if not folder.is_dir():
            continue
        split_layout = all((folder / f).is_dir() for f in MME_SPLIT_FOLDERS)
        text_dir, image_dir = (folder / "questions_answers_YN", folder / "images") if split_layout else (folder, folder)
        for txt in sorted(text_dir.glob("*.txt")):
            lines = [line for line in read_text(txt).splitlines() if line.strip()]  # UserError if not UTF-8
            for n, line in enumerate(lines, 1):
                fields = line.rstrip("\r").split("\t")
                where = f"{txt} line {n}"
                if len(fields) == 2:
                    image = _find_image(image_dir, txt.stem)
                    if image is None:
                        raise UserError(f"MME: {txt} has no image {txt.stem}.* in {image_dir}")
                    question, answer = fields
                elif len(fields) >= 3:
                    image = next((p for p in (image_dir / fields[0], folder / "images" / fields[0]) if p.is_file()),
                                 None)
                    if image is None:
                        raise UserError(f"MME: {where} names image {fields[0]!r}, not found in {image_dir}")
                    question, answer = fields[1], fields[2]
                else:
                    raise UserError(f"MME: {where}: expected question<TAB>Yes|No, got {line[:80]!r}")
                rows.append({"question": question.strip(), "answer": _mme_answer(answer, where), "subtask": subtask,
                             "image_id": f"{subtask}/{image.name}", "image": str(image)})
    if not rows:
        raise UserError(f"MME: no question files (*.txt) under {base}")
    return rows


def _with_example_ids(images: Sequence[str]) -> list[str]:
    """``<image>#<n>``: the n-th question of its image, in source order (question ids repeat per image)."""
    seen: dict[str, int] = {}
    out = []
    for image in images:
        seen[image] = seen.get(image, 0) + 1
        out.append(f"{image}#{seen[image]}")
    return out


def _check_file_image(path: str, where: str) -> str:
    if not Path(path).is_file():
        raise UserError(f"image file {path} not found (needed by {where}); fix the data root "
                        "(--data-root / MIMIC_DATA) or official paths of the task")
    return path


def mme_view(dataset: Any, task: str) -> tuple[ExampleView, list[str], list[str]]:
    """Examples over MME rows (columns question_id or image_id, question, answer, category or subtask,
    image); returns (view, image ids, subtasks)."""
    names = dataset.column_names
    image_col = "image_id" if "image_id" in names else "question_id"
    subtask_col = "subtask" if "subtask" in names else "category"
    missing = [c for c in (image_col, "question", "answer", subtask_col, "image") if c not in names]
    if missing:
        raise UserError(f"task {task}: MME data has no column(s) {missing}; it has {names}")
    images = [str(v) for v in column_values(dataset, image_col)]
    subtasks = [str(v) for v in column_values(dataset, subtask_col)]
    unknown = sorted(set(subtasks) - set(MME_SUBTASKS))
    if unknown:
        raise UserError(f"task {task}: MME subtask(s) {unknown} are not the benchmark's ({', '.join(MME_SUBTASKS)})")
    for i, answer in enumerate(column_values(dataset, "answer")):
        _mme_answer(str(answer), f"row {i} ({images[i]})")
    dataset = dataset.add_column("example_id", _with_example_ids(images))

    def to_example(row: dict[str, Any]) -> Example:
        image = row["image"]
        if isinstance(image, str):
            image = _check_file_image(image, f"task {task}, {row['example_id']}")
        return Example(id=row["example_id"], question=str(row["question"]), answers=(str(row["answer"]).strip(),),
                       image=image, meta={"subtask": str(row[subtask_col]), "image": str(row[image_col])})

    return ExampleView(dataset, to_example, "example_id"), images, subtasks


# --- SEED-Bench ----------------------------------------------------------------------------------------
SEED_COLUMNS = ("answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_id", "question", "question_id",
                "question_type_id")


def seed_view(dataset: Any, task: str, image_template: str | None, root: Path | None
              ) -> tuple[ExampleView, list[str], list[int]]:
    """Examples over the image questions of SEED-Bench rows; returns (view, image ids, question types)."""
    names = dataset.column_names
    missing = [c for c in SEED_COLUMNS if c not in names] + ([] if image_template or "image" in names else ["image"])
    if missing:
        raise UserError(f"task {task}: SEED-Bench data has no column(s) {missing}; it has {names}")
    if "data_type" in names:
        keep = [i for i, t in enumerate(column_values(dataset, "data_type")) if t == "image"]
        dataset = dataset.select(keep)
    ids = [str(v) for v in column_values(dataset, "question_id")]
    types = []
    for i, v in enumerate(column_values(dataset, "question_type_id")):
        try:
            types.append(int(v))
        except (TypeError, ValueError):
            raise UserError(f"task {task}: SEED-Bench question {ids[i]} has question_type_id {v!r}; expected an "
                            "integer (1-9 for the image dimensions)") from None
    video = sorted({t for t in types if t not in SEED_IMAGE_TYPES})
    if video:
        raise UserError(f"task {task}: SEED-Bench image questions with question_type_id {video}; the image "
                        f"dimensions are {min(SEED_IMAGE_TYPES)}-{max(SEED_IMAGE_TYPES)}")
    for c in "abcd":  # a missing option would be listed as "D. None" (or "D. ") in the prompt
        for i, choice in enumerate(column_values(dataset, f"choice_{c}")):
            if choice is None or not str(choice).strip():
                raise UserError(f"task {task}: SEED-Bench question {ids[i]} has no choice_{c}; a SEED-Bench "
                                "question has four options (choice_a to choice_d)")
    for i, answer in enumerate(column_values(dataset, "answer")):
        if str(answer).strip() not in SEED_OPTIONS:
            raise UserError(f"task {task}: SEED-Bench question {ids[i]} has answer {answer!r}; expected A, B, C or D")
    if len(set(ids)) != len(ids):
        raise UserError(f"task {task}: SEED-Bench question_id values repeat; each question needs its own id")

    def to_example(row: dict[str, Any]) -> Example:
        if image_template:
            path = str((root or Path(".")) / image_template.format(**row))
            image = _check_file_image(path, f"task {task}, question {row['question_id']}")
        else:
            image = row["image"]
            if isinstance(image, (list, tuple)):  # the hub stores a list (one image for image questions)
                if len(image) != 1:
                    raise UserError(f"task {task}: SEED-Bench question {row['question_id']} has {len(image)} "
                                    "images; an image question has one")
                image = image[0]
        choices = [row[f"choice_{c}"] for c in "abcd"]
        kind = int(row["question_type_id"])
        return Example(id=str(row["question_id"]), question=seed_question(str(row["question"]), choices),
                       answers=(str(row["answer"]).strip(),), image=image,
                       meta={"question_type": SEED_IMAGE_TYPES[kind], "question_type_id": kind,
                             "image": str(row["data_id"])})

    images = [str(v) for v in column_values(dataset, "data_id")]
    return ExampleView(dataset, to_example, "question_id"), images, types


# --- the loaders ---------------------------------------------------------------------------------------
def _hub_source(cfg: Any) -> dict[str, Any]:
    source = dict(cfg.hub)
    missing = [k for k in ("id", "split") if k not in source]
    unknown = [k for k in source if k not in ("id", "split", "name", "revision")]
    if missing or unknown:
        raise ConfigError(f"task {cfg.name}: invalid 'hub' section {source}: needs id and split (name, revision "
                          f"optional); missing {missing}, unknown {unknown}")
    return source


def _official_path(cfg: Any, key: str) -> Path:
    if key not in cfg.official:
        raise ConfigError(f"task {cfg.name}: official.{key} is missing (a path under the data root)")
    path = Path(cfg.data_root).expanduser() / cfg.official[key]
    return path


def benchmark_loaders(cfg: Any) -> dict[str, Callable[[], ExampleView]]:
    """Split loaders of a ``loader: mme`` / ``loader: seed_bench`` task (see the module doc). The
    configuration and the local files' presence are checked now; the data is read at the first split."""
    import datasets

    from pipeline.tasks import hub

    if cfg.source == "hub":
        source = _hub_source(cfg)

        def read_hub() -> tuple[ExampleView, list[str], list[Any]]:
            dataset = hub.load_hub_dataset(source, cfg.cache_dir, cfg.name)
            if cfg.loader == "mme":
                return mme_view(dataset, cfg.name)
            return seed_view(dataset, cfg.name, None, None)

        return split_views(read_hub, cfg)
    if cfg.loader == "mme":
        root = _official_path(cfg, "root")
        if not root.is_dir():
            raise UserError(f"task {cfg.name}: MME folder {root} not found; put MME_Benchmark_release_version "
                            f"under the data root ({cfg.data_root}; --data-root / MIMIC_DATA) or load it from the "
                            "hub with source=hub")
        return split_views(lambda: mme_view(datasets.Dataset.from_list(read_mme_folder(root)), cfg.name), cfg)
    questions = _official_path(cfg, "questions")
    if not questions.is_file():
        raise UserError(f"task {cfg.name}: SEED-Bench file {questions} not found; put SEED-Bench.json and "
                        f"SEED-Bench-image/ under the data root ({cfg.data_root}; --data-root / MIMIC_DATA) or "
                        "load it from the hub with source=hub")
    if "images" not in cfg.official:
        raise ConfigError(f"task {cfg.name}: official.images is missing (a template such as "
                          "seed_bench/SEED-Bench-image/{data_id})")
    root = Path(cfg.data_root).expanduser()
    return split_views(lambda: seed_view(load_json_records(questions, "questions", cfg.cache_dir), cfg.name,
                                         cfg.official["images"], root), cfg)


# --- per-group scores of an evaluation ----------------------------------------------------------------
def benchmark_breakdown(examples: Sequence[Any], records: Sequence[dict]) -> dict:
    """What an evaluation reports beside its score, from the examples' ``meta``:

    * MME (every example has ``subtask`` and ``image``): ``mme`` = {perception, cognition, total,
      images, left_out} and ``by_subtask`` = {subtask: {acc, acc_plus, score, n}}, as the official eval
      tool computes them, over the images whose two questions were both evaluated (a query budget that
      cuts a pair leaves that image out, counted in ``left_out`` as questions);
    * SEED-Bench (every example has ``question_type``): ``by_question_type`` = {"overall": %, name: %}
      in the benchmark's dimension order;
    * {} otherwise.
    """
    metas = [getattr(e, "meta", None) or {} for e in examples]
    if not metas:
        return {}
    if all("subtask" in m and "image" in m for m in metas):
        per_image: dict[tuple[str, str], int] = {}
        for m in metas:
            key = (m["subtask"], m["image"])
            per_image[key] = per_image.get(key, 0) + 1
        rows = [{"subtask": m["subtask"], "image": m["image"], "prediction": r["prediction"],
                 "answer": r["answers"][0]} for m, r in zip(metas, records, strict=True)
                if per_image[(m["subtask"], m["image"])] == 2]
        left_out = len(metas) - len(rows)
        if not rows:
            return {"mme": {"left_out": left_out, "images": 0}}
        scores = mme_scores(rows)
        by_subtask = {s: scores[s] for s in MME_SUBTASKS if s in scores}
        return {"mme": {"perception": scores["perception"], "cognition": scores["cognition"], "total": scores["total"],
                        "images": len(rows) // 2, "left_out": left_out},
                "by_subtask": by_subtask}
    if all("question_type" in m for m in metas):
        result = seed_accuracy([{"question_type": m["question_type"], "prediction": r["prediction"],
                                 "answer": r["answers"][0]} for m, r in zip(metas, records, strict=True)])
        order = [name for name in SEED_IMAGE_TYPES.values() if name in result["per_type"]]
        order += [t for t in result["per_type"] if t not in order]
        return {"by_question_type": {"overall": result["overall"], **{t: result["per_type"][t] for t in order}}}
    return {}
