"""Stage 2 on tiny models: learning, offline == online, kill + resume, methods, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny
from safetensors.torch import load_file

from pipeline.capture import StateCapture, span_positions
from pipeline.config import UserError, load_config
from pipeline.runtime import wrap_model
from pipeline.store import StoreError, open_store
from pipeline.students import load_student_dir
from stages.teacher_cache import TeacherCacheConfig
from stages.teacher_cache import run as cache_run
from stages.train_student import TrainConfig, setup
from stages.train_student import run as train_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def llama():
    """The shared tiny Llama; a test that fails half-way must not leave a student on it."""
    fam = tiny("llama")
    yield wrap_model(fam.model, fam.processor, "tiny-llama")
    for layer in fam.model.get_decoder().layers:
        layer.self_attn.__dict__.pop("_mimic_state", None)


def make_store(tmp_path, loaded, task="antonyms", n=6, **kw):
    cfg = load_config(TeacherCacheConfig, task=task, model=loaded.source.alias, shots=2, n_queries=n,
                      out=str(tmp_path / "store.zarr"), shard_size=4, batch_size=1, **kw)
    return cache_run(cfg, loaded=loaded, show_progress=False)


def train_cfg(tmp_path, store, **kw):
    opts = dict(cache=str(store), runs_dir=str(tmp_path / "runs"), epochs=1, seed=3407)
    opts.update(kw)
    return load_config(TrainConfig, **opts)


def distance_to_teacher(loaded, store_path, student):
    """Mean squared distance of the model's states to the cached ones, written here from the store."""
    store = open_store(store_path)
    from pipeline.prompts import build_prompt
    from pipeline.tasks import load_task

    task = load_task(store.attrs["task"])
    total = 0.0
    for i in range(len(store)):
        rec = store.read(i)
        q = task.split("train")[rec.query_id]
        p = build_prompt(loaded.family, loaded.processor, task.spec, q, [], [], task.demo_answer(q))
        batch = loaded.family.collate([p.encoded], loaded.processor, "right")
        pos, _ = span_positions([len(p.encoded)], [p.span_start], len(p.encoded) - p.span_start)
        with torch.no_grad(), StateCapture(loaded.model, store.attrs["layer_target"]) as cap:
            cap.positions = pos
            loaded.model(**batch)
            states = cap.stacked()[0]
        total += float((states - rec.hs.float()).pow(2).mean())
    return total / len(store)


def test_loss_decreases_and_states_move_toward_teacher(tmp_path, llama):
    store = make_store(tmp_path, llama, layer_target="layer")
    trainer = setup(train_cfg(tmp_path, store, epochs=12, lr=2e-2, lambda_gt=0.0), llama)
    before = distance_to_teacher(llama, store, trainer.student)
    from pipeline.rundir import Checkpoint

    trainer.train(Checkpoint(trainer.run_dir / "checkpoint", {}), show_progress=False)
    after = distance_to_teacher(llama, store, trainer.student)
    rows = [json.loads(x) for x in (trainer.run_dir / "train_log.jsonl").read_text().splitlines()]
    # a 2-layer random model: MimIC can represent about half of the teacher's shift (plateau ~0.56)
    assert rows[-1]["align"] < 0.85 * rows[0]["align"]
    assert after < 0.75 * before, (before, after)
    trainer.student.detach()


def test_offline_and_online_first_step_agree(tmp_path, llama):
    store = make_store(tmp_path, llama, n=4)
    grads, losses = [], []
    for online in (False, True):
        trainer = setup(train_cfg(tmp_path, store, online=online, resample_demos=False, batch_size=2), llama)
        items = [trainer.data[i] for i in trainer.epoch_groups(0)[0][0]]
        loss, parts = trainer.micro_loss(items, 0)
        loss.backward()
        grads.append([p.grad.clone() for _, p in trainer.student.trainable()])
        losses.append((float(loss.detach()), parts))
        trainer.student.detach()
    assert losses[0][1]["align"] > 0
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("online", [False, True])
def test_loader_micro_batches_give_the_loss_of_items_collated_here(tmp_path, online):
    """The training loader's workers collate the student prompts and pad the stored states
    (``MicroBatch``); the items come without their states and their prompts without images. Loss and
    gradients are those of the same items read and collated in the main process, bit for bit."""
    import copy

    from stages.training import MicroBatch

    fam = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(fam.model), fam.processor, "tiny-idefics2")
    store = make_store(tmp_path, loaded, task="shapes_vqa", n=4)
    trainer = setup(train_cfg(tmp_path, store, online=online, resample_demos=False, batch_size=3, num_workers=2),
                    loaded)
    micro = trainer.epoch_groups(0)[0][0]
    (sent,) = list(trainer.loader([micro]))
    assert isinstance(sent, MicroBatch) and len(sent) == 3 and sent.batch["pixel_values"].ndim == 5
    assert (sent.teacher is None) == online and all(it.hs is None for it in sent)
    assert all(image is None for it in sent for image in it.prompt.encoded.images)
    if not online:  # zero-padded (B, S, L, D)
        widths = [len(it.prompt.encoded) - it.prompt.span_start for it in sent]
        assert sent.teacher.shape[:2] == (3, max(widths))
        short = widths.index(min(widths))
        assert min(widths) == max(widths) or not sent.teacher[short, min(widths):].any()
    results = []
    for items in (sent, [trainer.data[i] for i in micro]):
        loss, parts = trainer.micro_loss(items, 0)
        loss.backward()
        results.append((loss.detach(), parts, [p.grad.clone() for _, p in trainer.student.trainable()]))
        for _, p in trainer.student.trainable():
            p.grad = None
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and parts_a == parts_b and parts_a["align"] > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    trainer.student.detach()


def _niceness(_item):
    import os

    return os.nice(0)


def test_loader_workers_run_at_a_lower_cpu_priority(tmp_path, llama):
    """The training loader's workers lower their CPU priority as they start (the step is host-bound on a GPU);
    the training process keeps its own."""
    import os

    from stages.trainer import WORKER_NICENESS

    store = make_store(tmp_path, llama, n=4)
    trainer = setup(train_cfg(tmp_path, store, num_workers=2), llama)
    try:
        loader = trainer.loader(trainer.epoch_groups(0)[0])
        assert loader.num_workers == 2
        before = os.nice(0)
        probe = torch.utils.data.DataLoader(range(4), batch_size=None, num_workers=2, collate_fn=_niceness,
                                            worker_init_fn=loader.worker_init_fn)
        assert list(probe) == [min(19, before + WORKER_NICENESS)] * 4
        assert os.nice(0) == before
    finally:
        trainer.student.detach()


@pytest.mark.parametrize("method", ["live", "lora"])
def test_baselines_train_save_and_reload(tmp_path, llama, method):
    base_keys = set(llama.model.state_dict())
    store = make_store(tmp_path, llama, topk=8)
    run_dir = train_run(train_cfg(tmp_path, store, method=method, max_steps=2), loaded=llama, show_progress=False)
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["method"] == method and cfg["store_fingerprint"]["task"] == "antonyms"
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    assert not set(tensors) & set(llama.model.state_dict())
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    if method == "lora":  # only the language model's self-attention projections
        assert all(".self_attn." in k for k in tensors)
    # the run detached its student: the model is the base model again, state dict included
    assert set(llama.model.state_dict()) == base_keys


def test_refusals(tmp_path, llama):
    with pytest.raises(StoreError, match="no teacher store"):
        setup(train_cfg(tmp_path, tmp_path / "missing.zarr"), llama)
    store = make_store(tmp_path, llama)
    other = tiny("llama")
    impostor = wrap_model(other.model, other.processor, "tiny-llama")
    object.__setattr__(impostor.source, "fingerprint", "0000")
    with pytest.raises(UserError, match="pass --force"):
        setup(train_cfg(tmp_path, store), impostor)
    without_topk = make_store(tmp_path / "no-topk", llama, topk=0)
    with pytest.raises(UserError, match="--topk"):
        setup(train_cfg(tmp_path, without_topk, method="live"), llama)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, llama, monkeypatch):
    from stages.trainer import Trainer

    store = make_store(tmp_path, llama)
    real = Trainer.micro_loss
    calls = {"n": 0}

    def poisoned(self, items, epoch):
        calls["n"] += 1
        loss, parts = real(self, items, epoch)
        return (loss * float("nan") if calls["n"] > 4 else loss), parts

    monkeypatch.setattr(Trainer, "micro_loss", poisoned)
    cfg = train_cfg(tmp_path, store, epochs=4, checkpoint_every=1, batch_size=1, grad_accum=2)
    with pytest.raises(UserError, match=r"loss became nan at step 3.*last good checkpoint"):
        train_run(cfg, loaded=llama, show_progress=False)
    state = torch.load(tmp_path / "runs" / "store-mimic" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2


def cli_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def warm_run(warm, args):
    """``python -m pipeline ARGS`` in a process of its own (forked by conftest's ``warm_pipeline`` from a
    server that has imported torch); raises like ``subprocess.run(..., check=True)``."""
    res = warm.run(args, cwd=REPO, env=cli_env())
    if res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
    return res


def store_from_the_cli(tmp_path, llama, warm, n=8):
    """The tiny Llama saved to disk and an 8-query store written by `pipeline teacher-cache`, so
    subprocesses load both like a user's: returns (command prefix, environment, store path)."""
    warm.prestart(cli_env(), 1)  # the server imports torch while the model is saved
    model_dir = tmp_path / "model"
    llama.model.save_pretrained(model_dir)
    llama.processor.save_pretrained(model_dir)
    env = cli_env()
    py = [sys.executable, "-m", "pipeline"]
    store = tmp_path / "s.zarr"
    warm_run(warm, ["teacher-cache", "--task", "antonyms", "--model", str(model_dir), "--shots", "2",
                    "--n-queries", str(n), "--out", str(store), "--device", "cpu"])
    return py, env, store


def test_sigkill_during_training_resumes_to_the_same_adapter(tmp_path, llama, warm_pipeline):
    py, env, store = store_from_the_cli(tmp_path, llama, warm_pipeline)
    args = ["train-student", "--cache", str(store), "--epochs", "6", "--checkpoint-every", "2", "--device", "cpu"]
    warm_run(warm_pipeline, [*args, "--runs-dir", str(tmp_path / "a")])
    cmd = [*args, "--runs-dir", str(tmp_path / "b")]
    proc = warm_pipeline.popen(cmd, cwd=REPO, env=env)  # a process of its own, to be killed
    ckpt = tmp_path / "b" / "s-mimic" / "checkpoint" / "state.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed; the test needs a longer run"
    assert ckpt.exists(), "the run ended before its first checkpoint; the test needs a longer run"
    warm_run(warm_pipeline, cmd)
    a = load_file(str(tmp_path / "a" / "s-mimic" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "s-mimic" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "s-mimic" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "s-mimic" / "train_log.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_reloaded_student_reproduces_trained_logits(tmp_path, llama):
    store = make_store(tmp_path, llama)
    run_dir = train_run(train_cfg(tmp_path, store, max_steps=3), loaded=llama, show_progress=False)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    student = load_student_dir(run_dir, llama.model, llama.geometry, "tiny-llama")
    with torch.no_grad():
        with student.disabled():
            base = llama.model(input_ids=ids).logits
        trained = llama.model(input_ids=ids).logits
    student.detach()
    assert not torch.allclose(base, trained)


def test_two_gloo_processes_match_one_process(tmp_path, llama, warm_pipeline):
    """DDP by gradient all-reduce: 2 ranks x (batch 1, accum 2) == 1 rank x (batch 1, accum 4)."""
    py, env, store = store_from_the_cli(tmp_path, llama, warm_pipeline)
    common = ["train-student", "--cache", str(store), "--epochs", "2", "--batch-size", "1", "--device", "cpu",
              "--name", "r"]
    warm_run(warm_pipeline, [*common, "--grad-accum", "4", "--runs-dir", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(30500 + os.getpid() % 1000), "-m", "pipeline", *common, "--grad-accum", "2",
                "--runs-dir", str(tmp_path / "two")]
    res = subprocess.run(torchrun, env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "with 2 processes" in res.stdout, "the two processes must really share the work"
    logs = [[json.loads(x) for x in (tmp_path / d / "r" / "train_log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 4
    for one, two in zip(*logs, strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "r" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "r" / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_ranks_take_the_same_number_of_steps(tmp_path, llama):
    """9 samples on 2 ranks: padded like DistributedSampler, so no rank waits in all-reduce forever."""
    store = make_store(tmp_path, llama, n=9)
    trainer = setup(train_cfg(tmp_path, store, batch_size=1, grad_accum=2), llama)
    trainer.world = 2
    per_rank = []
    for rank in range(2):
        trainer.rank = rank
        per_rank.append(trainer.epoch_groups(0))
    assert [len(g) for g in per_rank[0]] == [len(g) for g in per_rank[1]]
    seen = [i for groups in per_rank for g in groups for mb in g for i in mb]
    assert sorted(set(seen)) == list(range(9)) and len(seen) == 10
    assert len(per_rank[0]) == 3  # ceil(ceil(9 / 2) / batch 1 / accum 2)
    trainer.student.detach()


def test_store_fixes_the_task_and_online_needs_a_model(tmp_path, llama):
    """The store's provenance is the default; an option that contradicts it is refused, not obeyed."""
    store = make_store(tmp_path, llama, n=2)
    trainer = setup(train_cfg(tmp_path, store, task="antonyms"), llama)  # the same task: accepted
    assert trainer.data.task.name == "antonyms"
    trainer.student.detach()
    with pytest.raises(UserError, match="--task plurals differs from the store's task antonyms"):
        setup(train_cfg(tmp_path, store, task="plurals"), llama)
    with pytest.raises(UserError, match="--online without a store needs --model"):
        setup(load_config(TrainConfig, online=True, task="antonyms", shots=2, runs_dir=str(tmp_path / "r")), llama)


@pytest.mark.parametrize(("n", "given", "min_steps", "want_epochs", "source"), [
    (40, None, 300, 30, "--min-steps 300"),   # 10 steps an epoch (batch 2 x accumulation 2): 30 epochs
    (41, None, 300, 28, "--min-steps 300"),   # 11 steps an epoch: ceil(300 / 11) = 28
    (1000, None, 300, 5, "the model's default"),  # 250 steps an epoch: the model's 5 epochs are 1250 steps
    (40, None, 0, 5, "the model's default"),
    (40, 3, 300, 3, "--epochs"),
])
def test_default_training_length_reaches_min_steps_on_small_data(n, given, min_steps, want_epochs, source):
    from stages.train_student import training_epochs

    cfg = load_config(TrainConfig, epochs=given, min_steps=min_steps, batch_size=2, grad_accum=2)
    epochs, why = training_epochs(cfg, "smollm2-135m", n)  # pipeline/configs/models/smollm2-135m.yaml: 5 epochs
    assert (epochs, why.startswith(source)) == (want_epochs, True), why


def test_a_loss_still_falling_at_the_end_is_named():
    from stages.train_student import still_falling

    flat = [1.0] * 50
    assert still_falling(flat) is None
    assert still_falling([10.0 - 0.1 * i for i in range(50)]) is None  # -0.5 over 5 steps of ~5.6: 9%, finished enough
    steep = [10.0 * 0.9**i for i in range(50)]  # last 5 steps' mean vs the 5 before: -41%
    message = still_falling(steep)
    assert message is not None and "-41%" in message and "last 5 steps" in message
    assert still_falling(steep[:19]) is None  # too short to judge
    assert still_falling([float("nan")] * 30 + flat) is None


def test_run_records_the_epochs_it_used_and_why(tmp_path, llama):
    store = make_store(tmp_path, llama, n=4)
    cfg = load_config(TrainConfig, cache=str(store), runs_dir=str(tmp_path / "runs"), min_steps=6, batch_size=1,
                      grad_accum=1, device="cpu")
    run = Path(train_run(cfg, loaded=llama, show_progress=False))
    config = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # 4 queries, batch 1: 4 steps an epoch; the model's (tiny-llama: none) 5 epochs = 20 steps >= 6
    assert (config["epochs"], config["min_steps"], summary["steps"], summary["steps_per_epoch"]) == (5, 6, 20, 4)
    assert summary["epochs_from"].startswith("the model's default")
