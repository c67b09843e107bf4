"""Stage 2 under `accelerate launch`: two gloo processes on the CPU share the work and match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_student import REPO, llama, store_from_the_cli, warm_run  # noqa: F401 (llama: a fixture)

ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.mark.slow  # processes of their own that load torch and run the stage
def test_accelerate_launch_runs_two_processes_that_match_one(tmp_path, llama, warm_pipeline):  # noqa: F811
    """2 ranks x (batch 1, accumulation 2) under `accelerate launch --multi_gpu --num_processes 2 -m pipeline`
    (on a machine without a GPU: two CPU processes over gloo) ==
    1 process x (batch 1, accumulation 4): the same samples in every optimiser step, the same mean gradient."""
    py, env, store = store_from_the_cli(tmp_path, llama, warm_pipeline)  # an 8-query store
    common = ["train-student", "--cache", str(store), "--epochs", "2", "--batch-size", "1", "--device", "cpu",
              "--name", "r"]
    warm_run(warm_pipeline, [*common, "--grad-accum", "4", "--runs-dir", str(tmp_path / "one")])
    # HF_HOME: no accelerate config of the machine's user is read; the command line says everything
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(31500 + os.getpid() % 1000),
              "-m", "pipeline", *common, "--grad-accum", "2", "--runs-dir", str(tmp_path / "two")]
    res = subprocess.run(launch, env={**env, "HF_HOME": str(tmp_path / "hf")}, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "with 2 processes" in res.stdout, res.stdout[-2000:]
    summaries = [json.loads((tmp_path / d / "r" / "summary.json").read_text()) for d in ("one", "two")]
    # 8 queries x 2 epochs: all 16 samples in one process, 8 on each of the two ranks
    assert (summaries[0]["processes"], summaries[0]["samples_per_rank"]) == (1, [16])
    assert (summaries[1]["processes"], summaries[1]["samples_per_rank"]) == (2, [8, 8])
    logs = [[json.loads(x) for x in (tmp_path / d / "r" / "train_log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for one, two in zip(*logs, strict=True):  # the tolerances of test_two_gloo_processes_match_one_process
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "r" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "r" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_launch_precision_must_agree_with_the_run(tmp_path, llama, monkeypatch):  # noqa: F811
    """`accelerate launch --mixed_precision bf16` with the run's default --mixed-precision no is refused, not
    silently overridden by either side."""
    from test_train_student import make_store, train_cfg

    from pipeline.config import UserError
    from stages.train_student import setup

    store = make_store(tmp_path, llama, n=2)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(UserError, match="give --mixed-precision bf16 to train-student"):
        setup(train_cfg(tmp_path, store), llama)
    trainer = setup(train_cfg(tmp_path, store, mixed_precision="bf16"), llama)  # agreeing: accepted
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.student.detach()


@pytest.mark.slow  # processes of their own that load torch and run the stage
def test_launch_cpu_with_several_processes_is_refused_not_run_alone(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (several only through mpirun): it must
    not train alone as if it were two; the error names the form that starts two."""
    launch = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline", "train-student",
              "--cache", str(tmp_path / "none.zarr"), "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "accelerate launch --cpu started one process only" in errors[0], res.stderr[-2000:]
    assert "accelerate launch --multi_gpu --num_processes N -m pipeline" in errors[0]
    assert not (tmp_path / "runs").exists()
