"""The `pipeline` command as a user runs it: the README's custom tasks through all three commands,
`--help`, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny

REPO = Path(__file__).resolve().parents[1]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def pipeline(*args, cwd, check=True, warm=None):
    """``python -m pipeline ARGS``; with ``warm`` (conftest's ``warm_pipeline``) in a process of its own
    forked from a server that has imported torch, for the commands that load it."""
    if warm is not None:
        res = warm.run(list(args), cwd=cwd, env=env())
    else:
        res = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=env(), cwd=cwd,
                             capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} failed:\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, warm_pipeline):
    """Tiny text and multimodal models saved to disk: the CLI loads them by path like real ones."""
    warm_pipeline.prestart(env(), 2)  # the servers import torch while the models are saved
    dirs = {}
    for name in ("llama", "idefics2"):
        fam = tiny(name)
        d = tmp_path_factory.mktemp(f"tiny-{name}")
        fam.model.save_pretrained(d)
        fam.processor.save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.mark.parametrize("example,family", [("country_capital", "llama"), ("shape_colors", "idefics2")])
def test_readme_custom_task_runs_through_all_three_commands(tmp_path, model_dirs, example, family, warm_pipeline):
    task = REPO / "examples" / example / "task.yaml"
    warm = warm_pipeline
    pipeline("teacher-cache", "--task", task, "--model", model_dirs[family], "--shots", 2, "--device", "cpu",
             cwd=tmp_path, warm=warm)
    store = tmp_path / "cache" / "task.zarr"
    assert (store / "zarr.json").exists()
    pipeline("train-student", "--cache", store, "--max-steps", 2, "--device", "cpu", cwd=tmp_path, warm=warm)
    assert (tmp_path / "runs" / "task-mimic" / "adapter.safetensors").exists()
    res = pipeline("evaluate", "--device", "cpu", "--no-l2", cwd=tmp_path, warm=warm)  # defaults: the newest run
    table = (tmp_path / "results" / example / "table.md").read_text()
    assert "zero-shot" in table and "2-shot ICL" in table and "task-mimic" in table
    assert "zero-shot" in res.stdout
    result = json.loads((tmp_path / "results" / example / "task-mimic.json").read_text())
    assert result["n"] == 6 and len(result["records"]) == 6


def test_help_of_every_command(tmp_path):
    for cmd in ("teacher-cache", "train-student", "evaluate", "demo"):
        out = pipeline(cmd, "--help", cwd=tmp_path).stdout
        assert "--config" in out and "Usage" in out
    assert "Demonstrations per query" in pipeline("teacher-cache", "--help", cwd=tmp_path).stdout


@pytest.mark.parametrize("args,message", [
    (("teacher-cache", "--task", "nope"), "unknown task 'nope'"),
    (("teacher-cache", "--layer-target", "foo"), "'layer_target': got 'foo', expected one of mlp, layer, attn"),
    (("train-student", "--cache", "missing.zarr"), "no teacher store at missing.zarr"),
    (("evaluate",), "no student run under runs/"),
])
def test_user_errors_are_one_line(tmp_path, args, message, warm_pipeline):
    res = pipeline(*args, cwd=tmp_path, check=False, warm=warm_pipeline)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert message in res.stderr, res.stderr


def test_config_file_and_flag_precedence(tmp_path):
    from pipeline.config import load_config, read_yaml
    from stages.teacher_cache import TeacherCacheConfig

    (tmp_path / "c.yaml").write_text("shots: 3\nn_queries: 7\n")
    cfg = load_config(TeacherCacheConfig, read_yaml(tmp_path / "c.yaml"), shots=5)
    assert (cfg.shots, cfg.n_queries, cfg.seed) == (5, 7, 3407)
    (tmp_path / "bad.yaml").write_text("shots: many\nbogus: 1\n")
    res = pipeline("teacher-cache", "--config", tmp_path / "bad.yaml", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "unknown config file key 'bogus'" in res.stderr and "'shots'" in res.stderr
