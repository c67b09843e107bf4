"""The command as it meets a shell and a log file: help without torch, --version, completion, list options
as the README writes them, YAML 1.2 numbers, progress in a redirected log, and what a run and a store
record about the code that made them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny
from typer.testing import CliRunner

from pipeline import __version__, cli
from pipeline.config import ConfigError, load_config, read_yaml
from pipeline.rundir import OUTPUT_LOG, SUMMARY_FILE, OutputLog
from pipeline.runtime import Progress
from pipeline.settings import EvalConfig, TrainConfig
from pipeline.versions import LIBRARIES, library_versions

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}

_HELP_PROBE = r"""
import json, sys, time
from pipeline.cli import app
out = {}
for args in (["--help"], ["--version"], *([c, "--help"] for c in ("teacher-cache", "train-student", "evaluate",
                                                                  "inspect", "demo"))):
    start = time.perf_counter()
    sys.stdout = io = __import__("io").StringIO()
    try:
        app(args)
    except SystemExit as e:
        code = e.code
    sys.stdout = sys.__stdout__
    out[" ".join(args)] = {"code": code, "text": io.getvalue()}
out["heavy"] = sorted(m for m in ("torch", "transformers", "zarr", "stages.evaluate") if m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    """Every command's --help and --version, run in one fresh process (which must never import torch)."""
    res = subprocess.run([sys.executable, "-c", _HELP_PROBE], env=ENV, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_help_and_version_import_no_model_library(helps):
    assert helps["heavy"] == []
    assert all(h["code"] in (0, None) for k, h in helps.items() if k != "heavy")
    assert helps["--version"]["text"].strip() == f"mimic-pipeline {__version__}"


def test_help_shows_defaults_choices_completion_and_no_bool_type(helps):
    top = helps["--help"]["text"]
    assert "--version" in top and "--install-completion" in top and "--show-completion" in top
    evaluate = helps["evaluate --help"]["text"]
    assert "(default: zero-shot icl student)" in evaluate and "<str>..." in evaluate
    assert "(choices: support, train, eval)" in evaluate and "(default: 200)" in evaluate
    assert "(must be >= 1)" in helps["teacher-cache --help"]["text"]
    assert "STORE|RUN" in helps["inspect --help"]["text"]
    for key, h in helps.items():
        if key != "heavy":
            assert "<bool>" not in h["text"], key  # a flag takes no value


def test_shell_completion_of_options_and_choices(tmp_path):
    def complete(words: str) -> list[str]:
        env = {**ENV, "_PIPELINE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        res = subprocess.run([sys.executable, "-c", "from pipeline.cli import app; app(prog_name='pipeline')"],
                             env=env, cwd=tmp_path, capture_output=True, text=True)
        return res.stdout.split()

    assert "--modes" in complete("pipeline evaluate --mo")
    assert complete("pipeline tr") == ["train-student"]
    assert complete("pipeline evaluate --split ") == ["support", "train", "eval"]


@pytest.fixture
def captured(monkeypatch):
    """The config each stage would run with, parsed by the real `pipeline` app (the stages are not run)."""
    import pipeline.inspection
    import stages.evaluate
    import stages.train_student

    got = []
    for module in (stages.evaluate, stages.train_student, pipeline.inspection):
        monkeypatch.setattr(module, "run", got.append)

    def invoke(*args):
        res = CliRunner().invoke(cli.app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return got[-1]

    return invoke


def test_list_options_take_values_after_one_flag_or_repeated(captured):
    assert captured("evaluate", "--modes", "zero-shot", "icl", "--n-queries", 3).modes == ("zero-shot", "icl")
    assert captured("evaluate", "--modes", "icl", "--modes", "student").modes == ("icl", "student")
    cfg = captured("evaluate", "--runs", "runs/a", "b", "--modes=student", "icl", "--no-l2")
    assert (cfg.runs, cfg.modes, cfg.l2) == (("runs/a", "b"), ("student", "icl"), False)
    assert captured("evaluate").modes == EvalConfig.modes  # not given: the default
    # a positional argument before or after the options
    assert captured("inspect", "cache/x.zarr", "--no-norms").target == "cache/x.zarr"
    assert captured("inspect", "--no-norms", "cache/x.zarr").norms is False


def test_spread_list_values():
    lists = {"--modes", "--runs"}
    assert cli.spread_list_values(["--modes", "a", "b", "--x", "c"], lists) == ["--modes", "a", "--modes", "b", "--x", "c"]
    assert cli.spread_list_values(["--modes=a", "b"], lists) == ["--modes=a", "--modes", "b"]
    # the value right after the flag is taken whatever it looks like; nothing after `--` is touched
    assert cli.spread_list_values(["--runs", "-odd", "b", "--", "c"], lists) == ["--runs", "-odd", "--runs", "b", "--", "c"]
    assert cli.spread_list_values(["--x", "a", "b"], lists) == ["--x", "a", "b"]


def test_yaml_numbers_are_read_as_yaml_1_2(tmp_path, captured):
    path = tmp_path / "train.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-4\nseed: 012\nlambda_gt: '2e-1'\n")
    data = read_yaml(path)
    assert data == {"lr": 0.001, "weight_decay": 0.0005, "seed": 12, "lambda_gt": "2e-1"}  # PyYAML: '1e-3', 10
    cfg = load_config(TrainConfig, data)
    assert (cfg.lr, cfg.weight_decay, cfg.seed, cfg.lambda_gt) == (0.001, 0.0005, 12, 0.2)
    assert captured("train-student", "--config", path, "--cache", "x.zarr").lr == 0.001  # through the CLI
    # a number written as text is accepted for a float field, nothing else is
    assert load_config(TrainConfig, {"lr": "5e-3"}).lr == 0.005
    with pytest.raises(ConfigError, match="'lr': got 'infinity'"):
        load_config(TrainConfig, {"lr": "infinity"})
    (tmp_path / "int.yaml").write_text("epochs: 1e1\n")
    with pytest.raises(ConfigError, match="'epochs': got 10.0"):
        load_config(TrainConfig, read_yaml(tmp_path / "int.yaml"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_bytes(stream, steps: int = 3000, interval: float | None = None) -> str:
    bar = Progress(steps, "train-student demo", unit="step", stream=stream)
    if interval is not None:
        bar.plain_interval_s = interval
    for _ in range(steps):
        bar.update(1, samples=2, loss="0.5")
    bar.close()
    return stream.getvalue()


def test_progress_in_a_log_file_is_a_few_plain_lines():
    log = _progress_bytes(io.StringIO())  # not a terminal: a redirected stderr
    assert "\r" not in log and log.count("\n") == 1 and len(log) < 200, log
    assert log.startswith("train-student demo: 3000/3000 (100%) steps in 0:00:00, samples/s")
    every = _progress_bytes(io.StringIO(), steps=5, interval=0)
    assert every.count("\n") == 5 and "\r" not in every  # one line per interval (here each update), the last once
    assert every.splitlines()[-1].startswith("train-student demo: 5/5 (100%)")
    terminal = _progress_bytes(_Terminal())
    assert "\r" in terminal  # a terminal keeps tqdm's bar
    assert not _progress_bytes(io.StringIO(), steps=0)  # nothing done, nothing said


def test_output_log_keeps_printed_lines_not_redraws(tmp_path, capsys):
    path = tmp_path / "run" / OUTPUT_LOG
    with pytest.raises(ValueError), OutputLog() as out:
        print("before the run directory is known")
        out.attach(path)
        sys.stderr.write("\rbar 1/3\rbar 2/3\rbar 3/3\n")
        print("wrote run")
        sys.stderr.write("partial")
        raise ValueError("boom\nsecond line")
    assert "_Tee" not in (type(sys.stdout).__name__, type(sys.stderr).__name__)  # the streams are restored
    lines = path.read_text().splitlines()
    assert lines[0].startswith("=== ") and "torch " in lines[0]
    assert lines[1:] == ["before the run directory is known", "bar 3/3", "wrote run", "partial", "error: ValueError: boom"]
    assert "bar 2/3" in capsys.readouterr().err  # the console got everything
    with OutputLog(enabled=False) as out:  # ranks other than 0
        print("x")
        out.attach(tmp_path / "other.log")
    assert not (tmp_path / "other.log").exists()


def test_a_run_and_its_store_record_the_versions(tmp_path, monkeypatch, capsys):
    from pipeline.runtime import wrap_model
    from pipeline.store import VOLATILE_ATTRS, open_store
    from stages.teacher_cache import TeacherCacheConfig
    from stages.teacher_cache import run as cache_run
    from stages.train_student import run as train_run

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    cache_cfg = load_config(TeacherCacheConfig, task="antonyms", model="tiny-llama", shots=1, n_queries=2,
                            out=str(tmp_path / "store.zarr"), batch_size=2)
    store = cache_run(cache_cfg, loaded=loaded, show_progress=False)
    versions = open_store(store).attrs["code_version"]
    assert versions == library_versions() and set(LIBRARIES) <= set(versions) and versions["torch"]
    assert "code_version" in VOLATILE_ATTRS and "code_version" not in open_store(store).fingerprint
    # a library upgrade leaves the store reusable: the same command resumes it instead of refusing
    import stages.teacher_cache

    monkeypatch.setattr(stages.teacher_cache, "library_versions", lambda: {**versions, "torch": "99.0"})
    cache_run(cache_cfg, loaded=loaded, show_progress=False)

    run_dir = train_run(load_config(TrainConfig, cache=str(store), runs_dir=str(tmp_path / "runs"), max_steps=2,
                                    epochs=1), loaded=loaded, show_progress=True)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["versions"] == library_versions()
    log = (run_dir / OUTPUT_LOG).read_text()
    assert f"wrote {run_dir}" in log and log.startswith("=== ") and "\r" not in log
    assert f"wrote {run_dir}" in capsys.readouterr().out
