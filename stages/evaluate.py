"""`pipeline evaluate` — zero-shot, k-shot ICL and trained students on the same queries (DESIGN §6).

load config -> set up (runs, task, model; every adapter checked before any generation) -> run
(each mode: batched beam search, resumable per-sample records; students with zero demonstrations,
plus the per-layer L2 distance to the cached teacher states) -> save (``results/<task>/<name>.json``
per mode, ``l2_<run>.png``, and ``table.md`` across every result of the task).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline.adapters import ADAPTER_WEIGHTS, AdapterConfig, AdapterError, check_fits, read_adapter_config
from pipeline.config import ConfigError, UserError, config_to_dict, opt
from pipeline.metrics import JavaNotFoundError, score
from pipeline.plots import plot_layer_distances
from pipeline.students import geometry_tuple, load_student_dir
from pipeline.tasks import SPLITS, load_task
from stages.common import Loaded, load_for_stage, model_defaults
from stages.evaluation import (
    RESULT_KIND,
    TABLE_FILE,
    RecordLog,
    build_queries,
    generate_records,
    layer_distances,
    write_table,
)

MODES = ("zero-shot", "icl", "student")


@dataclass(frozen=True)
class EvalConfig:
    """Options of `pipeline evaluate` (YAML keys and CLI flags have the same names)."""

    runs: tuple[str, ...] = opt((), "Student run directories (or run names under --runs-dir); default: the most recent run (newest adapter file).")
    runs_dir: str = opt("runs", "Where run names are looked up and the most recent run is found.")
    task: str | None = opt(None, "Task name or task YAML path; default the run's task (from its teacher store).")
    model: str | None = opt(None, "Model alias, hub id or directory; default the run's base model.")
    shots: int | None = opt(None, "Demonstrations of the ICL mode; default the run's store's shots, else configs/models.")
    modes: tuple[str, ...] = opt(MODES, "Which of zero-shot, icl, student to evaluate.")
    n_queries: int = opt(200, "Queries: the first N of the split (built-in splits are seeded samples); 0 = the whole split. The paper reports whole validation splits.")
    split: str = opt("eval", "Split the queries come from.", SPLITS)
    batch_size: int = opt(8, "Prompts per generate call (left-padded).")
    num_beams: int = opt(3, "Beams of the beam search (3 as the paper's harness).")
    seed: int = opt(3407, "Seed of the demonstration sampler (the same sampler as teacher-cache).")
    results_dir: str = opt("results", "Where results/<task>/ is written.")
    l2: bool = opt(True, "Per-layer L2 distance of zero-shot and student states to the cached teacher states (when the run's store exists).")
    l2_queries: int = opt(32, "Cached training queries used by the L2 analysis (the first N of the store).")
    data_root: str | None = opt(None, "Root of the official data files (or env MIMIC_DATA); default the store's.")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto.")
    dtype: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32.")
    revision: str | None = opt(None, "Model revision (hub branch, tag or commit).")
    trust_remote_code: bool = opt(False, "Allow the model repository's own code to run.")


@dataclass
class RunInfo:
    """A student run: its directory, adapter config, teacher store and the stage-1 config if found."""

    path: Path
    adapter: AdapterConfig
    store: Path | None
    stage1: dict

    @property
    def name(self) -> str:
        return self.path.name


def check_config(config: EvalConfig) -> None:
    errors = [f"'modes': got {m!r}, expected some of {', '.join(MODES)}" for m in config.modes if m not in MODES]
    if not config.modes:
        errors.append(f"'modes': empty; give some of {', '.join(MODES)}")
    for key, least in (("batch_size", 1), ("num_beams", 1), ("n_queries", 0), ("l2_queries", 1)):
        if getattr(config, key) < least:
            errors.append(f"'{key}': got {getattr(config, key)}, expected >= {least}")
    if config.shots is not None and config.shots < 0:
        errors.append(f"'shots': got {config.shots}, expected >= 0")
    if errors:
        raise ConfigError("invalid EvalConfig:\n  - " + "\n  - ".join(errors))


def find_run_dirs(config: EvalConfig) -> list[Path]:
    """The runs asked for, or the most recent one under ``runs_dir`` (by its adapter file's mtime)."""
    runs_dir = Path(config.runs_dir)
    found = sorted(runs_dir.glob(f"*/{ADAPTER_WEIGHTS}"), key=lambda p: p.stat().st_mtime)
    if not config.runs:
        if not found:
            raise UserError(f"no student run under {runs_dir}/ (no */{ADAPTER_WEIGHTS}); train one with "
                            "`pipeline train-student`, pass --runs DIR, or drop the student mode (--modes zero-shot,icl)")
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


def read_run(path: Path) -> RunInfo:
    try:
        adapter = read_adapter_config(path)
    except AdapterError as err:
        raise UserError(str(err)) from err
    cfg_path = path / "config.yaml"
    train_cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    store = Path(train_cfg["cache"]) if train_cfg.get("cache") else None
    stage1_path = store / "teacher_cache_config.json" if store else None
    stage1 = json.loads(stage1_path.read_text()) if stage1_path and stage1_path.is_file() else {}
    return RunInfo(path, adapter, store, stage1)


def resolve_settings(config: EvalConfig, runs: list[RunInfo]) -> tuple[str, str | None, int, str | None]:
    """(task, model, shots, data_root): explicit options first, then the runs' stores, then defaults."""
    stores = [r.adapter.store_fingerprint for r in runs]
    task = config.task
    if task is None:
        named = {r.stage1.get("task") or s.get("task") for r, s in zip(runs, stores, strict=True)} - {None}
        if len(named) > 1:
            raise UserError(f"the runs were trained on different tasks ({', '.join(sorted(named))}); "
                            "evaluate them separately or pass --task")
        if not named:
            raise UserError("no task: pass --task (the runs do not record one)" if runs else
                            "no task: pass --task NAME (or evaluate a student run, whose task is the default)")
        task = named.pop()
    model = config.model or next((s.get("model") or r.adapter.base_model for r, s in zip(runs, stores, strict=True)), None)
    shots = config.shots
    if shots is None:
        shots = next((int(s["shots"]) for s in stores if s.get("shots")), None)
    if shots is None:
        shots = int(model_defaults(model or "").get("shots", 8))
    data_root = config.data_root or next((r.stage1.get("data_root") for r in runs if r.stage1.get("data_root")), None)
    return task, model, shots, data_root


def eval_examples(task: Any, config: EvalConfig) -> list[Any]:
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


def check_metric_ready(metric: str) -> None:
    """Fail before generating when CIDEr cannot run (no Java), with the metrics module's message."""
    if metric == "cider" and shutil.which("java") is None:
        try:
            score(metric, ["a"], [["a"]])  # raises JavaNotFoundError before running anything
        except JavaNotFoundError as err:
            raise UserError(str(err)) from err


def source_name(source: Any) -> str:
    # stages.common.wrap_model records `.name`, pipeline.models.ModelSource has `.alias`
    return getattr(source, "name", None) or getattr(source, "alias", "")


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


class Evaluation:
    """One `pipeline evaluate` call: the task, the model, the queries, and where results go."""

    def __init__(self, config: EvalConfig, task: Any, loaded: Loaded, shots: int, show_progress: bool):
        self.config, self.task, self.loaded, self.shots = config, task, loaded, shots
        self.show_progress = show_progress
        self.examples = eval_examples(task, config)
        self.out_dir = Path(config.results_dir) / task.name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model_name = source_name(loaded.source)

    def fingerprint(self, mode: str, extra: dict | None = None) -> dict:
        """What must match for saved records to be reused (prompts are matched per record)."""
        return {"task": self.task.name, "mode": mode, "model_fingerprint": self.loaded.source.fingerprint,
                "num_beams": self.config.num_beams, "max_new_tokens": self.task.spec.max_new_tokens,
                "dtype": str(next(self.loaded.model.parameters()).dtype), **(extra or {})}

    def mode(self, name: str, mode: str, shots: int, fingerprint: dict, extra: dict | None = None) -> dict:
        """Generate (missing records only), score, write ``<name>.json``; returns the saved payload."""
        log = RecordLog(self.out_dir, name, fingerprint)
        queries = build_queries(self.task, self.loaded, self.examples, shots, self.config.seed)
        records = generate_records(self.loaded, self.task, queries, log, self.config.batch_size,
                                   self.config.num_beams, f"evaluate {name}", self.show_progress)
        metric = self.task.spec.metric
        try:
            scored = score(metric, [r["prediction"] for r in records], [r["answers"] for r in records])
        except (JavaNotFoundError, ValueError) as err:
            raise UserError(f"{metric} failed for {name}: {err} (the predictions are kept in {log.partial}; "
                            "re-run to score them without generating again)") from err
        for record, value in zip(records, scored["per_sample"], strict=True):
            record["score"] = value
        n = len(records)
        payload = {
            "kind": RESULT_KIND, "task": self.task.name, "name": name, "mode": mode, "shots": shots,
            "split": self.config.split, "model": self.model_name, "metric": metric, "score": scored["score"], "n": n,
            "mean_latency_ms": sum(r["latency_ms"] for r in records) / n,
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
            "generation": {"num_beams": self.config.num_beams, "max_new_tokens": self.task.spec.max_new_tokens,
                           "stop_strings": list(self.loaded.family.stop_strings), "padding": "left"},
            "config": {**config_to_dict(self.config), "task": self.task.name, "model": self.model_name,
                       "shots": self.shots},
            "fingerprint": fingerprint, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}), "records": records,
        }
        log.finish(payload)
        return payload

    def student(self, run: RunInfo) -> dict:
        """A run's student with zero demonstrations, then (if asked and possible) the L2 analysis."""
        loaded = self.loaded
        if run.adapter.base_fingerprint and run.adapter.base_fingerprint != loaded.source.fingerprint:
            print(f"warning: {run.name} was trained on {run.adapter.base_model} ({run.adapter.base_fingerprint}), "
                  f"evaluating on {self.model_name} ({loaded.source.fingerprint})")
        try:
            student = load_student_dir(run.path, loaded.model, loaded.geometry, self.model_name)
        except AdapterError as err:
            raise UserError(str(err)) from err
        adapter_time = (run.path / ADAPTER_WEIGHTS).stat().st_mtime_ns
        fingerprint = self.fingerprint("student", {"run": str(run.path.resolve()), "adapter_mtime_ns": adapter_time})
        try:
            extra = {"run": str(run.path), "adapter": {"method": run.adapter.method, "variant": run.adapter.variant},
                     "l2": self.l2(run, student)}
            return self.mode(run.name, "student", 0, fingerprint, extra)
        finally:
            student.detach()

    def l2(self, run: RunInfo, student: Any) -> dict:
        """Per-layer L2 distances (and ``l2_<run>.png``), or why they were skipped."""
        if not self.config.l2:
            return {"skipped": "--l2 false"}
        if run.store is None or not run.store.exists():
            return {"skipped": f"the run's teacher store {run.store} does not exist"}
        result = layer_distances(self.loaded, self.task, student, run.store, self.config.l2_queries,
                                 self.config.batch_size)
        png = self.out_dir / f"l2_{run.name}.png"
        plot_layer_distances({"zero-shot": result["zero-shot"], run.name: result["student"]}, png,
                             f"{self.task.name}: L2 to {run.adapter.store_fingerprint.get('shots', '?')}-shot ICL states")
        return {**result, "png": str(png)}


def check_runs_fit(runs: list[RunInfo], loaded: Loaded) -> None:
    """Every adapter must fit the model, checked before anything is generated."""
    for run in runs:
        try:
            check_fits(run.adapter, geometry_tuple(loaded.geometry), source_name(loaded.source))
        except AdapterError as err:
            raise UserError(f"{run.path}: {err}") from err


def run(config: EvalConfig, loaded: Loaded | None = None, show_progress: bool = True) -> dict:
    """Evaluate every mode on the same queries; returns ``{"task", "results": {name: payload}, "table", ...}``."""
    check_config(config)
    runs = [read_run(p) for p in find_run_dirs(config)] if "student" in config.modes else []
    task_name, model_name, shots, data_root = resolve_settings(config, runs)
    if "icl" in config.modes and shots < 1:
        raise UserError(f"the icl mode needs --shots >= 1 (got {shots})")
    task = load_task(task_name, **({"data_root": data_root} if data_root else {}))
    check_metric_ready(task.spec.metric)
    if loaded is None:
        if model_name is None:
            raise UserError("no model: pass --model (or evaluate a student run, whose base model is the default)")
        loaded = load_for_stage(model_name, "mimic", config.device, config.dtype, config.revision,
                                config.trust_remote_code)
    check_runs_fit(runs, loaded)
    evaluation = Evaluation(config, task, loaded, shots, show_progress)
    results = {}
    with mimic_routing(loaded):
        if "zero-shot" in config.modes:
            results["zero-shot"] = evaluation.mode("zero-shot", "zero-shot", 0, evaluation.fingerprint("zero-shot"))
        if "icl" in config.modes:
            name = f"icl-{shots}shot"
            fingerprint = evaluation.fingerprint("icl", {"shots": shots, "seed": config.seed})
            results[name] = evaluation.mode(name, "icl", shots, fingerprint)
        for info in runs:
            if info.name in results:
                raise UserError(f"run {info.path} is named like another result ({info.name}); rename the run directory")
            results[info.name] = evaluation.student(info)
    table = write_table(evaluation.out_dir, task.name, shots)
    if show_progress:
        print(table)
    return {"task": task.name, "results": results, "table": table, "table_path": str(evaluation.out_dir / TABLE_FILE),
            "results_dir": str(evaluation.out_dir)}
