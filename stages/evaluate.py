"""`pipeline evaluate` — zero-shot, k-shot ICL and trained students on the same queries.

load config -> set up (runs, task, results folder, model; every adapter checked — readable, finite,
of the shapes its config names, fitting the model — before any generation) -> run (each mode:
batched beam search, resumable per-sample records; students with zero demonstrations, plus the
per-layer L2 distance to the cached teacher states) -> save (one JSON per result in
``results/<task>/``, ``l2_<result>.png``, and ``table.md`` across every result of the task).

A result is kept per name and settings (model, split, n, beams, max_new_tokens, dtype, seed): a run
with other settings writes beside the earlier results instead of replacing them (see
``stages.evaluation`` for the file names), and ``table.md`` groups the rows by settings, with the
settings as each group's heading and speed-ups computed only within a group.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.adapters import (
    ADAPTER_WEIGHTS,
    AdapterConfig,
    check_fits,
    read_adapter_config,
    read_adapter_tensors,
)
from pipeline.config import ConfigError, UserError
from pipeline.decoding import AUTO_COMPILE_QUERIES, CompiledDecoding, wants_compile
from pipeline.locks import dir_lock
from pipeline.metrics import JavaNotFoundError, score
from pipeline.provenance import resolve
from pipeline.rundir import RunDir
from pipeline.runtime import Loaded, check_task_fits_model, load_for_stage
from pipeline.settings import MODES, EvalConfig
from pipeline.store import StorePath, store_location
from pipeline.students import geometry_tuple
from pipeline.tasks import DATA_ROOT_ENV, Hook, load_task
from stages.evaluation import Evaluation, ResultsFolder, settings_key, settings_of


class EvalConfigError(ConfigError, UserError):
    """Options of `pipeline evaluate` that are out of range (all of them named in one line)."""


@dataclass
class RunInfo:
    """A student run: its directory, adapter config, teacher store and its training config.yaml."""

    path: Path
    adapter: AdapterConfig
    store: StorePath | None  # a local path or an fsspec URL (pipeline.store.StoreURL)
    train_config: dict

    @property
    def name(self) -> str:
        return self.path.name


EXTRA_METRICS = ("chair",)
"""``--metrics``: scores computed beside the task's own metric."""


def check_config(config: EvalConfig) -> None:
    errors = [f"'modes': got {m!r}, expected some of {', '.join(MODES)}" for m in config.modes if m not in MODES]
    if not config.modes:
        errors.append(f"'modes': empty, expected some of {', '.join(MODES)}")
    for key, least in (("batch_size", 1), ("num_beams", 1), ("n_queries", 0), ("l2_queries", 1)):
        if getattr(config, key) < least:
            errors.append(f"'{key}': got {getattr(config, key)}, expected >= {least}")
    errors += [f"'metrics': got {m!r}, expected some of {', '.join(EXTRA_METRICS)}" for m in config.metrics
               if m not in EXTRA_METRICS]
    if config.shots is not None and config.shots < 0:
        errors.append(f"'shots': got {config.shots}, expected >= 0")
    if errors:
        raise EvalConfigError(f"invalid evaluate options: {'; '.join(errors)}; fix them on the command line or in "
                              "the --config file")


def find_run_dirs(config: EvalConfig) -> list[Path]:
    """The runs asked for, or the most recent one under ``runs_dir`` (by its adapter file's mtime)."""
    runs_dir = Path(config.runs_dir)
    found = sorted(runs_dir.glob(f"*/{ADAPTER_WEIGHTS}"), key=lambda p: p.stat().st_mtime)
    if not config.runs:
        if not found:
            raise UserError(f"no student run under {runs_dir}/ (no */{ADAPTER_WEIGHTS}); train one with "
                            "`pipeline train-student`, pass --runs DIR, or drop the student mode (--modes zero-shot --modes icl)")
        return [found[-1].parent]
    dirs = []
    for run in config.runs:
        candidates = [Path(run), runs_dir / run]
        path = next((p for p in candidates if (p / ADAPTER_WEIGHTS).is_file()), None)
        if path is None:
            names = ", ".join(p.parent.name for p in found) or "none"
            raise UserError(f"run {run!r} not found: no {ADAPTER_WEIGHTS} in {' or '.join(map(str, candidates))}; "
                            f"runs under {runs_dir}/: {names}")
        dirs.append(path)
    return dirs


def default_runs(config: EvalConfig) -> list[RunInfo]:
    """Without the student mode, the runs still give the defaults (task, model, shots) when they exist."""
    try:
        return [read_run(p) for p in find_run_dirs(config)]
    except UserError:
        return []


def read_train_config(path: Path) -> dict:
    """The run's training options (its ``config.yaml``), or {} when there is none."""
    return RunDir(path).read_config()


def read_run(path: Path) -> RunInfo:
    """A run's adapter config (validated) and where its teacher store is (from its config.yaml)."""
    adapter = read_adapter_config(path)
    train_config = read_train_config(path)
    cache = train_config.get("cache")
    store = store_location(cache, check=False) if isinstance(cache, str) and cache else None
    return RunInfo(path, adapter, store, train_config)


def run_records(run: RunInfo) -> dict:
    """What a run says it was made with: its store's attributes (recorded in the adapter), then its
    training config (the model it used, its data root)."""
    fingerprint = run.adapter.store_fingerprint
    record = {k: v for k, v in run.train_config.items() if k in ("model", "data_root", "task")}
    record.update({k: v for k, v in fingerprint.items() if v not in (None, "")})
    record.setdefault("model", run.adapter.base_model or None)
    return record


def resolve_settings(config: EvalConfig, runs: list[RunInfo]) -> tuple[str, str | None, int, str | None]:
    """(task, model, shots, data_root): explicit options first, then the runs' stores (which must agree),
    then the model's defaults (``pipeline.provenance.resolve``)."""
    prov = resolve(task=config.task, model=config.model, shots=config.shots, data_root=config.data_root,
                   records=[run_records(r) for r in runs], what="the runs")
    if prov.task is None:
        raise UserError("no task: pass --task (the runs do not record one)" if runs else
                        "no task: pass --task NAME (or evaluate a student run, whose task is the default)")
    return prov.task, prov.model, prov.shots, prov.data_root


def eval_examples(task: Any, config: Any) -> list[Any]:
    """The first ``n_queries`` of the split; a split with no examples or without answers is refused."""
    examples = list(task.split(config.split))
    if config.n_queries:
        examples = examples[: config.n_queries]
    if not examples:
        raise UserError(f"task {task.name}: split '{config.split}' has no examples; nothing to evaluate")
    unanswered = [str(e.id) for e in examples if not e.answers]
    if unanswered:
        raise UserError(f"task {task.name}: {len(unanswered)} of {len(examples)} '{config.split}' queries have no "
                        f"reference answers (e.g. {unanswered[:3]}), so they cannot be scored; evaluate a split "
                        "with answers (--split eval)")
    return examples


def check_metric_ready(metric: Any) -> None:
    """Fail before generating when CIDEr cannot run (no Java), with the metrics module's message; a
    metric hook is imported now, so that a broken one fails before generation too."""
    if isinstance(metric, Hook):
        metric.resolve()
        return
    if metric == "cider" and shutil.which("java") is None:
        try:
            score(metric, ["a"], [["a"]])  # raises JavaNotFoundError before running anything
        except JavaNotFoundError as err:
            raise UserError(str(err)) from err


def coco_annotation_files(config: EvalConfig, data_root: str | None) -> tuple[list[Path], list[Path]]:
    """(instances_*.json, captions_*.json) of ``--coco-annotations`` (default ``<data root>/coco/annotations``);
    a missing folder or kind of file is a one-line ``UserError``."""
    root = data_root or os.environ.get(DATA_ROOT_ENV) or "data"
    folder = Path(config.coco_annotations or Path(root) / "coco" / "annotations").expanduser()
    if not folder.is_dir():
        raise UserError(f"--metrics chair: COCO annotation folder {folder} not found; pass --coco-annotations DIR "
                        "holding instances_val2014.json and captions_val2014.json (COCO 2014 annotations)")
    files = {kind: sorted(folder.glob(f"{kind}_*.json")) for kind in ("instances", "captions")}
    missing = [f"{kind}_*.json" for kind, found in files.items() if not found]
    if missing:
        raise UserError(f"--metrics chair: no {' and no '.join(missing)} in {folder}; CHAIR needs the COCO instance "
                        "and caption annotations of the captioned images (e.g. instances_val2014.json and "
                        "captions_val2014.json for the Karpathy test split)")
    return files["instances"], files["captions"]


def load_chair(config: EvalConfig, task: Any, examples: list[Any], data_root: str | None) -> Any:
    """The CHAIR evaluator of ``--metrics chair`` (None without it), refused for a task that is not
    captioning and for queries whose images no annotation file describes, before any generation."""
    if "chair" not in config.metrics:
        return None
    if task.spec.kind != "caption":
        raise UserError(f"--metrics chair scores image captions, and task {task.name} is a {task.spec.kind} task; "
                        "evaluate a caption task (e.g. coco_caption) or drop --metrics chair")
    from pipeline.chair import Chair

    instances, captions = coco_annotation_files(config, data_root)
    chair = Chair([str(p) for p in instances], [str(p) for p in captions])
    chair.compute({e.id: "" for e in examples})  # raises for an image the annotations do not describe
    return chair


@contextmanager
def mimic_routing(loaded: Loaded) -> Iterator[None]:
    """Route the language model's attention to "mimic" (students need it) and restore it after.

    With no heads attached, "mimic" is the stock sdpa kernel, so zero-shot and ICL are unaffected.
    """
    from pipeline.attention import ATTN_NAME, register_mimic_attention

    register_mimic_attention()
    previous = loaded.model.config.get_text_config(decoder=True)._attn_implementation
    if previous == ATTN_NAME:
        yield
        return
    loaded.model.set_attn_implementation(loaded.family.attn_implementation(ATTN_NAME))
    try:
        yield
    finally:
        loaded.model.set_attn_implementation(loaded.family.attn_implementation(previous or "sdpa"))


def check_runs_readable(runs: list[RunInfo]) -> None:
    """Every adapter's weights: a readable safetensors file holding finite floating-point tensors of
    the names and shapes its config describes (``AdapterError`` naming the file and tensor otherwise).
    Runs before the model is loaded; LoRA sizes that only the model knows are checked by
    ``check_runs_fit``."""
    for run in runs:
        read_adapter_tensors(run.path, run.adapter)


def check_runs_fit(runs: list[RunInfo], loaded: Loaded, shots: int) -> None:
    """Every adapter must fit the model and have its own result name; checked before generating."""
    taken = {"zero-shot", f"icl-{shots}shot", f"icl-{shots}shot-similar"}
    for run in runs:
        if run.name in taken:
            raise UserError(f"run {run.path} has the same result name as another mode or run ({run.name}); "
                            "rename the run directory")
        taken.add(run.name)
        try:
            check_fits(run.adapter, geometry_tuple(loaded.geometry), loaded.source.alias)
        except UserError as err:
            raise type(err)(f"{run.path}: {err}") from err
        if run.adapter.method == "lora":  # the LoRA matrices' sizes against the model's projections
            read_adapter_tensors(run.path, run.adapter, loaded.model)


def run(config: EvalConfig, loaded: Loaded | None = None, show_progress: bool = True) -> dict:
    """Evaluate every mode on the same queries; returns ``{"task", "results": {name: payload}, "table", ...}``."""
    check_config(config)
    runs = [read_run(p) for p in find_run_dirs(config)] if "student" in config.modes else []
    check_runs_readable(runs)
    task_name, model_name, shots, data_root = resolve_settings(config, runs or default_runs(config))
    if "icl" in config.modes and shots < 1:
        raise UserError(f"the icl mode needs --shots >= 1 (got {shots}); pass --shots N or drop the icl mode")
    task = load_task(task_name, **({"data_root": data_root} if data_root else {}))
    check_metric_ready(task.spec.metric)
    examples = eval_examples(task, config)
    chair = load_chair(config, task, examples, data_root)  # annotations read and checked before any model
    if config.report_to != "none":
        from stages.trainer import check_tracker

        check_tracker(config.report_to)  # a missing tracker package: before any model
    folder = ResultsFolder(config.results_dir, task.name)
    folder.prepare()  # writable: checked before the model is loaded
    with dir_lock(folder.path):  # one writer per results folder
        folder.results()  # refuse a folder holding another task's results
        folder.check_table()
        if loaded is None:
            if model_name is None:
                raise UserError("no model: pass --model (or evaluate a student run, whose base model is the default)")
            loaded = load_for_stage(model_name, device=config.device, dtype=config.dtype, revision=config.revision,
                                    trust_remote_code=config.trust_remote_code)
        check_task_fits_model(task, loaded)
        check_runs_fit(runs, loaded, shots)
        if loaded.decoding is None and wants_compile(config.compile, loaded.device, len(examples),
                                                     AUTO_COMPILE_QUERIES):
            loaded.decoding = CompiledDecoding(loaded.model)
        evaluation = Evaluation(config, task, loaded, examples, shots, show_progress, folder)
        evaluation.chair = chair
        similar = config.demos == "similar"  # demonstrations by similarity: an ICL result of its own name
        icl_name = f"icl-{shots}shot" + ("-similar" if similar else "")
        names = ([n for m, n in (("zero-shot", "zero-shot"), ("icl", icl_name)) if m in config.modes]
                 + [r.name for r in runs])
        evaluation.plan(names, runs)  # every file to be written is chosen and checked before generating
        results = {}
        with mimic_routing(loaded):
            if "zero-shot" in config.modes:
                results["zero-shot"] = evaluation.mode("zero-shot", "zero-shot", 0, evaluation.fingerprint("zero-shot"))
            if "icl" in config.modes:
                fingerprint = evaluation.fingerprint("icl", {"shots": shots, "seed": config.seed,
                                                             **({"demos": "similar"} if similar else {})})
                results[icl_name] = evaluation.mode(icl_name, "icl", shots, fingerprint, {"demos": config.demos})
            for info in runs:
                results[info.name] = evaluation.student(info)
        table = write_table(folder, shots)
        report_scores(config, folder.path, task.name, results)
        if show_progress:
            print(table)
        return {"task": task.name, "results": results, "table": table, "table_path": str(folder.path / "table.md"),
                "results_dir": str(folder.path), "files": {name: str(evaluation.path(name)) for name in results},
                "settings": evaluation.settings}


EVAL_TRACKER_DIR = "tensorboard"
"""``<results-dir>/<task>/tensorboard/``: the event files of ``evaluate --report-to tensorboard``."""


def tracked_values(results: dict[str, dict]) -> dict[str, float]:
    """``eval/<result name>/<key>``: each result's score (under its metric's name), ms/query and, for a
    student with the L2 analysis, the mean L2 to the teacher without and with it."""
    values = {}
    for name, payload in results.items():
        values[f"eval/{name}/{payload['metric']}"] = float(payload["score"])
        values[f"eval/{name}/ms_per_query"] = float(payload["mean_latency_ms"])
        mean = (payload.get("l2") or {}).get("mean")
        if isinstance(mean, dict):
            for key in ("zero-shot", "student"):
                if isinstance(mean.get(key), (int, float)):
                    values[f"eval/{name}/l2_{key}"] = float(mean[key])
    return values


def report_scores(config: EvalConfig, folder: Path, task_name: str, results: dict[str, dict]) -> None:
    """``--report-to``: log ``tracked_values`` once through accelerate's trackers (step 0 of this evaluation)."""
    if config.report_to == "none" or not results:
        return
    from pipeline.runtime import make_accelerator

    accelerator = make_accelerator(log_with=config.report_to, project_dir=folder)
    project = EVAL_TRACKER_DIR if config.report_to == "tensorboard" else "mimic-pipeline"
    accelerator.init_trackers(project, {"task": task_name, "modes": ",".join(results)},
                              init_kwargs={"wandb": {"name": f"evaluate-{task_name}", "dir": str(folder)}})
    accelerator.log(tracked_values(results), step=0)
    for tracker in accelerator.trackers:  # not end_training: it would destroy a process group still in use
        tracker.finish()


def _label(row: dict) -> str:
    similar = " (similar demos)" if row.get("demos") == "similar" else ""
    return {"zero-shot": "zero-shot", "icl": f"{row.get('shots')}-shot ICL{similar}"}.get(row["mode"],
                                                                                          f"student {row['name']}")


MODE_ORDER = {"zero-shot": 0, "icl": 1, "student": 2}


def _order(row: dict) -> tuple:
    return (MODE_ORDER.get(row["mode"], 3), row.get("shots", 0), row["name"])


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def settings_title(settings: dict) -> str:
    """A group's heading: the settings its rows share."""
    model_id = str(settings.get("model_fingerprint") or "").rpartition(":")[2][:8]
    return (f"### model {settings.get('model')}" + (f" [{model_id}]" if model_id else "")
            + f", split {settings.get('split')}, n={settings.get('n')}, num_beams={settings.get('num_beams')}, "
            f"max_new_tokens={settings.get('max_new_tokens')}, dtype {settings.get('dtype')}, seed {settings.get('seed')}")


def group_table(rows: list[dict], metric: str, shots: int) -> list[str]:
    """One group's rows; speed-up = this group's ICL row's ms/query over each row's."""
    icl = sorted((r for r in rows if r["mode"] == "icl"), key=lambda r: r.get("demos") == "similar")  # random first
    ref = next((r for r in icl if r.get("shots") == shots), max(icl, key=lambda r: r.get("shots", 0), default=None))
    speed_head = f"speed-up vs {ref['shots']}-shot ICL" if ref else "speed-up vs ICL"
    lines = [f"| mode | {metric} | n | ms/query | prompt tokens/query | {speed_head} | parameters | "
             "mean L2 to teacher (zero-shot -> student) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=_order):
        speed = f"{ref['mean_latency_ms'] / row['mean_latency_ms']:.2f}x" if ref and row["mean_latency_ms"] > 0 else "-"
        value = f"{row['score']:.2f}" if row["metric"] == metric else f"{row['score']:.2f} ({row['metric']})"
        params = f"{row['parameters']:,}" if isinstance(row.get("parameters"), int) else "-"
        lines.append(f"| {_label(row)} | {value} | {row['n']} | {row['mean_latency_ms']:.1f} | "
                     f"{row['mean_prompt_tokens']:.1f} | {speed} | {params} | {_l2_cell(row)} |")
    return lines


def _l2_cell(row: dict) -> str:
    """``a -> b``: the mean per-layer L2 distance to the cached teacher states without and with the student."""
    mean = (row.get("l2") or {}).get("mean")
    if not isinstance(mean, dict) or not all(isinstance(mean.get(k), (int, float)) for k in ("zero-shot", "student")):
        return "-"
    return f"{mean['zero-shot']:.3g} -> {mean['student']:.3g}"


def results_table(rows: list[dict], task_name: str, shots: int) -> str:
    """Markdown: one section per settings group (its settings as the heading), one row per result;
    speed-ups are computed within a group only, never across settings."""
    metric = rows[0]["metric"] if rows else "score"
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(settings_key(settings_of(row)), []).append(row)
    lines = [f"## {task_name}"]
    for key in sorted(groups, key=lambda k: [_sortable(v) for v in (settings_of(groups[k][0]).get("model"), *k)]):
        lines += ["", settings_title(settings_of(groups[key][0])), "", *group_table(groups[key], metric, shots)]
        lines += answer_type_table(groups[key])
        lines += mme_table(groups[key]) + question_type_table(groups[key]) + chair_table(groups[key])
    return "\n".join(lines) + "\n"


def answer_type_table(rows: list[dict]) -> list[str]:
    """The VQA accuracy by answer type of the rows that have it (official VQAv2 / OK-VQA annotations)."""
    typed = [r for r in sorted(rows, key=_order) if isinstance(r.get("by_answer_type"), dict)]
    if not typed:
        return []
    kinds = list(dict.fromkeys(k for r in typed for k in r["by_answer_type"]))
    lines = ["", "By answer type (VQA accuracy, as the official evaluation prints it):", "",
             "| mode | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for r in typed:
        cells = [f"{r['by_answer_type'][k]:.2f}" if k in r["by_answer_type"] else "-" for k in kinds]
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return lines


def _breakdown_table(rows: list[dict], key: str, title: str) -> list[str]:
    """Rows that have ``key`` (a flat {column: %} mapping), one column per key."""
    typed = [r for r in sorted(rows, key=_order) if isinstance(r.get(key), dict)]
    if not typed:
        return []
    kinds = list(dict.fromkeys(k for r in typed for k in r[key]))
    lines = ["", title, "", "| mode | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for r in typed:
        cells = [f"{r[key][k]:.2f}" if isinstance(r[key].get(k), (int, float)) else "-" for k in kinds]
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return lines


def question_type_table(rows: list[dict]) -> list[str]:
    """SEED-Bench accuracy by question type (the benchmark's dimensions) of the rows that have it."""
    return _breakdown_table(rows, "by_question_type", "By question type (SEED-Bench accuracy, %):")


def mme_table(rows: list[dict]) -> list[str]:
    """MME's perception and cognition scores, then acc / acc+ per subtask, of the rows that have them."""
    typed = [r for r in sorted(rows, key=_order) if isinstance(r.get("mme"), dict) and "perception" in r["mme"]]
    if not typed:
        return []
    lines = ["", "MME (official eval tool: score = acc + acc+ per subtask; perception sums 10 subtasks, max 2000; "
             "cognition 4, max 800):", "", "| mode | perception | cognition | total | images | questions left out |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in typed:
        m = r["mme"]
        lines.append(f"| {_label(r)} | {_cell(m, 'perception')} | {_cell(m, 'cognition')} | {_cell(m, 'total')} | "
                     f"{m.get('images', '-')} | {m.get('left_out', 0)} |")
    subtasks = list(dict.fromkeys(s for r in typed for s in (r.get("by_subtask") or {})))
    if subtasks:
        lines += ["", "MME per subtask (acc / acc+, %):", "", "| mode | " + " | ".join(subtasks) + " |",
                  "|---|" + "---:|" * len(subtasks)]
        for r in typed:
            per = r.get("by_subtask") or {}
            cells = [f"{_cell(per[s], 'acc', '.1f')} / {_cell(per[s], 'acc_plus', '.1f')}" if s in per else "-"
                     for s in subtasks]
            lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return lines


def chair_table(rows: list[dict]) -> list[str]:
    """CHAIR of the rows evaluated with ``--metrics chair`` (lower CHAIRs / CHAIRi: fewer hallucinated objects)."""
    typed = [r for r in sorted(rows, key=_order) if isinstance(r.get("chair"), dict)]
    if not typed:
        return []
    lines = ["", "CHAIR (object hallucination, %; lower CHAIRs / CHAIRi is better):", "",
             "| mode | CHAIRs | CHAIRi | recall | captions | object mentions |", "|---|---:|---:|---:|---:|---:|"]
    for r in typed:
        c = r["chair"]
        lines.append(f"| {_label(r)} | {_cell(c, 'CHAIRs')} | {_cell(c, 'CHAIRi')} | {_cell(c, 'recall')} | "
                     f"{c.get('n_captions', '-')} | {c.get('n_mentions', '-')} |")
    return lines


def _cell(values: Any, key: str, spec: str = ".2f") -> str:
    """``values[key]`` formatted, or "-" where a result file (an older or edited one) lacks that number."""
    value = values.get(key) if isinstance(values, dict) else None
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def write_table(folder: ResultsFolder, shots: int) -> str:
    """``table.md`` across every result of the folder's task; returns its text (without the file's marker line)."""
    table = results_table([data for _, data in folder.results()], folder.task_name, shots)
    folder.write_table(table)
    return table
