"""The run directory's owner module: what it writes, what it refuses, what --overwrite removes."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import UserError
from pipeline.rundir import CONFIG_FILE, LOG_FILE, RunDir


def test_config_round_trip_and_a_newer_schema_is_refused(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.write_config({"lr": 0.005, "epochs": 5})
    on_disk = yaml.safe_load((run.path / CONFIG_FILE).read_text())
    assert on_disk == {"run_schema_version": 1, "lr": 0.005, "epochs": 5}
    assert run.read_config() == {"lr": 0.005, "epochs": 5}
    (run.path / CONFIG_FILE).write_text(yaml.safe_dump({**on_disk, "run_schema_version": 99}))
    with pytest.raises(UserError, match="run_schema_version 99"):
        run.read_config()
    (run.path / CONFIG_FILE).write_text("[1, 2]\n")
    with pytest.raises(UserError, match="expected a mapping"):
        run.read_config()


def test_log_stops_at_a_torn_line_and_keeps_steps_up_to_a_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    rows = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    (tmp_path / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    assert run.read_log() == rows
    assert run.read_log(upto=3) == rows[:3]


def test_remove_outputs_deletes_only_what_stage_2_writes(tmp_path):
    run = RunDir(tmp_path)
    for name in ("adapter.safetensors", "adapter_config.json", "config.yaml", "summary.json", "loss_curve.png",
                 LOG_FILE, "config.yaml.tmp", "notes.txt", "my_analysis.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "mine").mkdir()
    run.remove_outputs()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "my_analysis.png", "notes.txt"]


def test_remove_outputs_deletes_the_peft_copy_but_not_foreign_files_in_it(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "peft").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "peft" / name).write_text("x")
    run.remove_outputs()
    assert not (tmp_path / "peft").exists()
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_model.safetensors").write_text("x")
    (tmp_path / "peft" / "mine.txt").write_text("x")
    run.remove_outputs()
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["mine.txt"]


def test_a_store_run_of_an_earlier_version_resumes_despite_the_old_n_queries_default(tmp_path):
    """Before --n-queries applied to stores, a store run recorded its old default 1000 (and trained on the
    whole store): that reads as today's None. The same value on an --online run, which did use it, does not."""
    run = RunDir(tmp_path / "r")
    checkpoint_dir = run.path / "checkpoint"
    checkpoint_dir.mkdir(parents=True)
    for old, now, refused in (({"cache": "s.zarr", "n_queries": 1000}, {"cache": "s.zarr", "n_queries": None}, False),
                              ({"cache": "s.zarr", "n_queries": 50}, {"cache": "s.zarr", "n_queries": None}, True),
                              ({"cache": None, "n_queries": 1000}, {"cache": None, "n_queries": None}, True)):
        (checkpoint_dir / "config.json").write_text(json.dumps(old))
        checkpoint = run.checkpoint(now)
        if refused:
            with pytest.raises(UserError, match="n_queries"):
                checkpoint.check_config(overwrite=False)
        else:
            checkpoint.check_config(overwrite=False)
