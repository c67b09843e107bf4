"""Hostile input through the real `pipeline` command: every case must end in exit 2, one line on
stderr that names the problem, and no traceback — never in a silent wrong result.

One module fixture saves a tiny Llama, writes a store with `teacher-cache` and trains a run with
`train-student` (all as processes of their own, as a user would); each case then damages a copy of
what it needs. The cases run two at a time in a thread pool (each is a separate process, forked by
conftest's ``warm_pipeline`` from a server that has already imported torch: `python -m pipeline`
without the seconds of imports); every case is its own test that asserts on its own outcome. Store
faults must be refused before the first training step: the case's run directory must hold no
training log.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def pipeline(warm, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in a process of its own (see conftest's ``warm_pipeline``)."""
    return warm.run(list(args), cwd=cwd, env=ENV, timeout=300)


@dataclass
class World:
    root: Path
    model: Path
    store: Path
    run: Path


@dataclass
class Case:
    """``make(world, case_dir)`` prepares the damage and returns the CLI arguments; ``expect``: regex
    fragments that must all appear in stderr; ``check(world, case_dir)``: extra assertions."""

    id: str
    make: Callable[[World, Path], list]
    expect: tuple[str, ...]
    check: Callable[[World, Path], None] | None = None


# ---------------------------------------------------------------------------------------------
# damage helpers (independent of the code under test: plain file operations)

def copy_store(world: World, d: Path) -> Path:
    out = d / "store.zarr"
    shutil.copytree(world.store, out)
    return out


def shard_file(store: Path, array: str) -> Path:
    """The first chunk/shard file of ``array`` (zarr v3 default keys ``c/0/...``)."""
    files = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    assert files, f"no chunk files under {store / array}"
    return files[0]


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def train_on(store_of: Callable[[World, Path], Path]) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        store = store_of(world, d)
        return ["train-student", "--cache", store, "--max-steps", 2, "--device", "cpu", "--runs-dir", d / "runs",
                "--name", "r"]
    return make


def no_training_log(world: World, d: Path) -> None:
    assert not (d / "runs" / "r" / "train_log.jsonl").exists(), "refused only after training started"


def damaged_store(array: str, how: str) -> Callable[[World, Path], Path]:
    def store_of(world: World, d: Path) -> Path:
        store = copy_store(world, d)
        f = shard_file(store, array)
        {"delete": f.unlink, "flip": lambda: flip_byte(f), "truncate": lambda: truncate(f)}[how]()
        return store
    return store_of


def edited_attrs(world: World, d: Path) -> Path:
    store = copy_store(world, d)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (store / "zarr.json").write_text(json.dumps(meta))
    return store


def other_weights(world: World, d: Path) -> list:
    other = d / "model"
    shutil.copytree(world.model, other)
    weights = other / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(k for k in tensors if k.endswith("mlp.down_proj.weight"))[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return ["train-student", "--cache", world.store, "--model", other, "--max-steps", 2, "--device", "cpu",
            "--runs-dir", d / "runs", "--name", "r"]


def model_dir_with(damage: Callable[[Path], None]) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        m = d / "badmodel"
        shutil.copytree(world.model, m)
        damage(m)
        return ["teacher-cache", "--task", "antonyms", "--model", m, "--shots", 2, "--n-queries", 4,
                "--out", d / "s.zarr", "--device", "cpu"]
    return make


def user_task(rows: str | None, yaml_text: str | None = None) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        (d / "data.jsonl").write_text(rows if rows is not None else "")
        (d / "task.yaml").write_text(yaml_text or "name: t\nkind: text\nmetric: exact_match\nprompt: '{question} ->'\n"
                                     "answer: ' {answer}'\nfile: data.jsonl\nsplit_column: split\n")
        return ["teacher-cache", "--task", d / "task.yaml", "--model", world.model, "--shots", 1, "--n-queries", 2,
                "--out", d / "s.zarr", "--device", "cpu"]
    return make


GOOD_ROWS = "".join(json.dumps({"id": f"r{i}", "input": f"w{i}", "answer": f"a{i}", "split": s}) + "\n"
                    for i, s in enumerate(["support", "support", "train", "train", "eval"]))


def run_copy(world: World, d: Path) -> Path:
    out = d / "run"
    shutil.copytree(world.run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def evaluate_run(damage: Callable[[Path], None]) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        run = run_copy(world, d)
        damage(run)
        return ["evaluate", "--runs", run, "--modes", "student", "--n-queries", 2, "--no-l2", "--device", "cpu",
                "--results-dir", d / "results"]
    return make


def no_results(world: World, d: Path) -> None:
    assert not list((d / "results").rglob("*.json")), "an adapter fault was scored"


def rewrite_adapter(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        tensors = load_file(str(run / "adapter.safetensors"))
        save_file(fn(tensors), str(run / "adapter.safetensors"))
    return damage


def pickle_as_adapter(run: Path) -> None:
    marker = run / "pwned"
    payload = {"x": torch.zeros(2)}
    torch.save(payload, run / "adapter.safetensors")
    assert not marker.exists()


class _Pwn:
    """Unpickling this creates the file ``path``: proof, if it exists, that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def raw_pickle_as_adapter(run: Path) -> None:
    (run / "adapter.safetensors").write_bytes(pickle.dumps(_Pwn(run / "pwned")))


def resume_with_truncated_state(world: World, d: Path) -> list:
    runs = d / "runs"
    shutil.copytree(world.run, runs / "base", ignore=shutil.ignore_patterns(".lock"))
    truncate(runs / "base" / "checkpoint" / "state.pt")
    return ["train-student", "--cache", world.store, "--max-steps", 4, "--device", "cpu", "--runs-dir", runs,
            "--name", "base"]


def option(*args: object) -> Callable[[World, Path], list]:
    return lambda world, d: list(args)


def existing_store_option(*extra: object) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        return ["teacher-cache", "--task", "antonyms", "--model", world.model, "--shots", 2, "--n-queries", 6,
                "--out", copy_store(world, d), "--device", "cpu", *extra]
    return make


def not_a_dir(flag: str, cmd: str) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        (d / "file").write_text("not a directory\n")
        base = {"teacher-cache": ["teacher-cache", "--task", "antonyms", "--model", world.model, "--shots", 2,
                                  "--n-queries", 4, "--device", "cpu"],
                "train-student": ["train-student", "--cache", world.store, "--max-steps", 1, "--device", "cpu"],
                "evaluate": ["evaluate", "--runs", world.run, "--modes", "zero-shot", "--n-queries", 2,
                             "--device", "cpu", "--no-l2"]}[cmd]
        target = d / "file" / "x.zarr" if flag == "--out" else d / "file"
        return [*base, flag, target]
    return make


READ_ONLY = Path("/sys/fs/pipeline-hostile")  # read-only even for root (tests run as root in CI)


def _read_only_here() -> bool:
    try:
        READ_ONLY.mkdir()
    except OSError:
        return True
    READ_ONLY.rmdir()
    return False


def read_only(flag: str, cmd: str) -> Callable[[World, Path], list]:
    def make(world: World, d: Path) -> list:
        args = not_a_dir(flag, cmd)(world, d)
        args[-1] = READ_ONLY / "x.zarr" if flag == "--out" else READ_ONLY
        return args
    return make


def image_task_with_text_png(world: World, d: Path) -> list:
    (d / "images").mkdir()
    (d / "images" / "bad.png").write_text("this is text, not a PNG\n")
    rows = "".join(json.dumps({"id": f"r{i}", "question": "What colour?", "image": "images/bad.png",
                               "answers": ["red"] * 10, "split": s}) + "\n"
                   for i, s in enumerate(["support", "support", "train", "train", "eval"]))
    (d / "data.jsonl").write_text(rows)
    (d / "task.yaml").write_text("name: t\nkind: vqa\nmetric: vqa_accuracy\nprompt: 'Q: {question} A:'\n"
                                 "answer: ' {answer}'\nfile: data.jsonl\nsplit_column: split\n")
    return ["teacher-cache", "--task", d / "task.yaml", "--model", world.root / "vlm", "--shots", 1,
            "--n-queries", 2, "--out", d / "s.zarr", "--device", "cpu"]


CASES = [
    # options, checked when parsed
    Case("tc-n-queries-negative", option("teacher-cache", "--n-queries", -5), ("'n_queries': got -5, expected >= 1",)),
    Case("tc-n-queries-zero", option("teacher-cache", "--n-queries", 0), ("'n_queries': got 0",)),
    Case("tc-batch-size-negative", option("teacher-cache", "--batch-size", -2, "--out", "never.zarr"),
         ("'batch_size': got -2",), lambda w, d: not (d / "never.zarr").exists() or pytest.fail("store left")),
    Case("tc-shard-size-zero", option("teacher-cache", "--shard-size", 0), ("'shard_size': got 0",)),
    Case("tc-topk-negative", option("teacher-cache", "--topk", -1), ("'topk': got -1",)),
    Case("tc-all-at-once", option("teacher-cache", "--topk", -1, "--seed", -3, "--shots", -1),
         ("'topk'", "'seed'", "'shots'")),
    Case("ts-lr-negative", option("train-student", "--lr", -1), ("'lr': got -1.0, expected > 0",)),
    Case("ts-batch-size-zero", option("train-student", "--batch-size", 0), ("'batch_size': got 0",)),
    Case("ts-grad-accum-zero", option("train-student", "--grad-accum", 0), ("'grad_accum': got 0",)),
    Case("ts-checkpoint-every-zero", option("train-student", "--checkpoint-every", 0), ("'checkpoint_every': got 0",)),
    Case("ts-epochs-zero", option("train-student", "--epochs", 0), ("'epochs': got 0",)),
    Case("ts-warmup-ratio", option("train-student", "--warmup-ratio", 2.0), ("'warmup_ratio': got 2.0",)),
    Case("ts-online-without-shots", option("train-student", "--online", "--task", "antonyms"), ("needs --shots",)),
    Case("demo-threads-zero", option("demo", "--threads", 0), ("'threads': got 0",)),
    Case("demo-bad-model", option("demo", "--model", "no-such-model-xyz"), ("no-such-model-xyz",)),
    Case("ev-batch-size-zero", option("evaluate", "--batch-size", 0), ("'batch_size'",)),
    Case("ts-device-unknown", lambda w, d: ["train-student", "--cache", w.store, "--device", "tpu", "--runs-dir",
                                            d / "runs"], ("unknown --device 'tpu'", "cuda:N")),
    Case("ev-device-mps", lambda w, d: ["evaluate", "--task", "antonyms", "--model", w.model, "--modes", "zero-shot",
                                        "--device", "mps", "--results-dir", d / "r"], ("--device mps", "cpu or cuda")),
    Case("config-yaml-syntax", lambda w, d: (d / "c.yaml").write_text("shots: 2\nlr: [1,\n") and
         ["train-student", "--config", d / "c.yaml"], ("c.yaml", "line 3")),
    Case("config-yaml-list", lambda w, d: (d / "c.yaml").write_text("- 1\n- 2\n") and
         ["train-student", "--config", d / "c.yaml"], ("must hold a mapping",)),
    # tasks and data files
    Case("task-yaml-syntax", user_task(GOOD_ROWS, "name: t\nkind: [text\n"), ("task.yaml", "line", "invalid YAML")),
    Case("task-jsonl-broken-line", user_task(GOOD_ROWS + '{"id": "x", "input": \n'), ("data.jsonl", "line 6",
                                                                                          "invalid JSON")),
    Case("task-jsonl-empty", user_task(""), ("data.jsonl",)),
    Case("task-question-object", user_task(GOOD_ROWS.replace('"input": "w2"', '"input": {"a": 1}')),
         ("data.jsonl", "line 3", "field 'input'", "JSON object")),
    Case("task-image-text-png", image_task_with_text_png, ("bad.png",)),
    # models
    Case("model-bogus-config", model_dir_with(lambda m: (m / "config.json").write_text("{not json")), ("badmodel",)),
    Case("model-truncated-weights", model_dir_with(lambda m: truncate(m / "model.safetensors")),
         ("badmodel", "truncated")),
    Case("tc-topk-beyond-vocab", existing_store_option("--topk", 100000, "--overwrite"), ("--topk 100000",)),
    Case("tc-max-length-beyond-positions", existing_store_option("--max-length", 10**7),
         ("--max-length 10000000",)),
    Case("tc-shard-size-on-existing-store", existing_store_option("--shard-size", 3), ("shard_size",)),
    Case("tc-other-config-names-keys", existing_store_option("--seed", 1), ("demo_seed",)),
    # paths
    Case("tc-out-under-a-file", not_a_dir("--out", "teacher-cache"), ("file",)),
    Case("ts-runs-dir-is-a-file", not_a_dir("--runs-dir", "train-student"), ("file",)),
    Case("ev-results-dir-is-a-file", not_a_dir("--results-dir", "evaluate"), ("file", "cannot write results to")),
    Case("tc-out-read-only", read_only("--out", "teacher-cache"), ("pipeline-hostile",)),
    Case("ts-runs-dir-read-only", read_only("--runs-dir", "train-student"), ("pipeline-hostile",)),
    Case("ev-results-dir-read-only", read_only("--results-dir", "evaluate"), ("pipeline-hostile",)),
    # store faults: refused before the first training step, naming store corruption
    Case("store-hs-shard-deleted", train_on(damaged_store("hs", "delete")), ("hs",), no_training_log),
    Case("store-hs-shard-truncated", train_on(damaged_store("hs", "truncate")), ("hs",), no_training_log),
    Case("store-hs-byte-flipped", train_on(damaged_store("hs", "flip")), ("hs",), no_training_log),
    Case("store-done-byte-flipped", train_on(damaged_store("done", "flip")), ("done",), no_training_log),
    Case("store-lengths-byte-flipped", train_on(damaged_store("lengths", "flip")), ("lengths",), no_training_log),
    Case("store-token-ids-byte-flipped", train_on(damaged_store("token_ids", "flip")), ("token_ids",), no_training_log),
    Case("store-token-ids-chunk-deleted", train_on(damaged_store("token_ids", "delete")), ("token_ids",),
         no_training_log),
    Case("store-query-ids-chunk-deleted", train_on(damaged_store("query_ids", "delete")), ("query_ids",),
         no_training_log),
    Case("store-icd-ids-byte-flipped", train_on(damaged_store("icd_ids", "flip")), ("icd_ids",), no_training_log),
    Case("store-attrs-edited", train_on(edited_attrs), ("schema_version",), no_training_log),
    Case("store-other-weights", other_weights, ("--force",), no_training_log),
    # students on disk
    Case("adapter-truncated", evaluate_run(lambda r: truncate(r / "adapter.safetensors")), ("adapter.safetensors",),
         no_results),
    Case("adapter-raw-pickle", evaluate_run(raw_pickle_as_adapter),
         ("adapter.safetensors", "is a Python pickle, not a safetensors file; it was not loaded"),
         lambda w, d: no_results(w, d) or (not (d / "run" / "pwned").exists() or pytest.fail("pickle ran"))),
    Case("adapter-torch-save", evaluate_run(pickle_as_adapter),
         ("adapter.safetensors", "not a safetensors file; it was not loaded"),
         lambda w, d: no_results(w, d) or (not (d / "run" / "pwned").exists() or pytest.fail("pickle ran"))),
    Case("adapter-all-nan", evaluate_run(rewrite_adapter(lambda t: {k: torch.full_like(v, float("nan"))
                                                                    for k, v in t.items()})),
         (r"non-finite values \(NaN or inf\)", "adapter.safetensors"),
         no_results),
    Case("adapter-int64", evaluate_run(rewrite_adapter(lambda t: {k: v.long() for k, v in t.items()})),
         ("dtype int64, expected a floating-point dtype",), no_results),
    Case("adapter-shapes-disagree", evaluate_run(rewrite_adapter(lambda t: {k: v[..., :1].contiguous()
                                                                             for k, v in t.items()})),
         ("shape",), no_results),
    Case("checkpoint-truncated", resume_with_truncated_state, ("checkpoint",)),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, warm_pipeline) -> dict[str, tuple[subprocess.CompletedProcess, Path, World]]:
    warm_pipeline.prestart(ENV, 2)  # the servers import torch while the models are saved
    root = tmp_path_factory.mktemp("hostile")
    fam = tiny("llama")
    model = root / "model"
    fam.model.save_pretrained(model)
    fam.processor.save_pretrained(model)
    vlm = tiny("idefics2")
    vlm.model.save_pretrained(root / "vlm")
    vlm.processor.save_pretrained(root / "vlm")
    store = root / "store.zarr"
    res = pipeline(warm_pipeline, "teacher-cache", "--task", "antonyms", "--model", model, "--shots", 2,
                   "--n-queries", 6, "--shard-size", 4, "--out", store, "--device", "cpu", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    res = pipeline(warm_pipeline, "train-student", "--cache", store, "--max-steps", 2, "--checkpoint-every", 1,
                   "--device", "cpu", "--runs-dir", root / "runs", "--name", "base", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    world = World(root, model, store, root / "runs" / "base")

    def one(case: Case) -> tuple[str, tuple]:
        d = root / case.id
        d.mkdir()
        return case.id, (pipeline(warm_pipeline, *case.make(world, d), cwd=d), d, world)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_a_one_line_error(outcomes, case):
    import re

    if case.id.endswith("read-only") and not _read_only_here():
        pytest.skip(f"{READ_ONLY.parent} is writable on this machine")
    res, d, world = outcomes[case.id]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-2000:]}"
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    for fragment in case.expect:
        assert re.search(fragment, errors[0], re.IGNORECASE), f"{fragment!r} not in:\n{errors[0]}"
    if case.check:
        case.check(world, d)


def test_enough_cases():
    assert len(CASES) >= 40
