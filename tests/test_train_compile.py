"""The student's training forward through torch.compile (``train-student --compile``) trains as eagerly.

The reference is the same Trainer with compilation off: the loss and every student parameter's gradient
of a compiled micro-batch must equal the eager ones within float tolerance, for a text model and a VLM
(images through the vision tower), on micro-batches of different padded lengths; the compiled function
must really have run, with a bounded number of graphs (automatic dynamic shapes, no per-step Python state
in the guards). A compiler failure redoes the step eagerly (one warning); other errors are not swallowed.
On the CPU the compiled function is inductor's C++ code.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from test_decoding import broken_compile
from test_train_student import make_store, train_cfg

from pipeline.runtime import wrap_model
from stages.train_student import run as train_run
from stages.train_student import setup


def loaded_model(name: str):
    fam = tiny(name)
    return wrap_model(fam.model, fam.processor, f"tiny-{name}")


@pytest.fixture(scope="module", params=[pytest.param(("llama", "antonyms"), id="llama"),
                                        pytest.param(("idefics2", "shapes_vqa"), id="idefics2", marks=pytest.mark.slow)])
def trained_setup(request, tmp_path_factory):
    """(trainer with --compile on and a randomised MimIC student, micro-batches of 3 padded lengths)."""
    name, task = request.param
    loaded = loaded_model(name)
    tmp = tmp_path_factory.mktemp(name)
    store = make_store(tmp, loaded, task=task, n=8)
    trainer = setup(train_cfg(tmp, store, compile="on", batch_size=2), loaded)
    with torch.no_grad():  # a fresh student is the identity (v = 0): gradients of every part are non-zero now
        g = torch.Generator().manual_seed(0)
        for _, p in trainer.student.trainable():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    items = sorted((trainer.data[i] for i in range(len(trainer.data))), key=lambda it: len(it.prompt.encoded))
    micro, widths = [], set()
    for a in range(0, len(items) - 1):  # pairs of consecutive lengths, each pair a new padded length
        w = len(items[a + 1].prompt.encoded)
        if w not in widths:
            widths.add(w)
            micro.append([items[a], items[a + 1]])
    assert len(micro) >= 3, widths
    yield trainer, micro[:3]
    trainer.student.detach()


def loss_and_grads(trainer, items):
    for _, p in trainer.student.trainable():
        p.grad = None
    loss, parts = trainer.micro_loss(items, 0)
    loss.backward()
    return loss.detach(), parts, [p.grad.clone() for _, p in trainer.student.trainable()]


def test_compiled_step_matches_eager(trained_setup):
    trainer, micro = trained_setup
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = trainer.loaded.model
    for items in micro:
        trainer.compile = False
        calls = trainer.compiled_calls
        want_loss, want_parts, want = loss_and_grads(trainer, items)
        assert trainer.compiled_calls == calls  # eager: the compiled function untouched
        trainer.compile = True
        got_loss, got_parts, got = loss_and_grads(trainer, items)
        assert trainer.compiled_calls == calls + 1
        assert "forward" not in model.__dict__  # the class's forward is back
        assert want_parts["align"] > 0 and want_parts["gt"] > 0
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert got_parts == pytest.approx(want_parts, rel=1e-5, abs=1e-6)
        assert len(got) == len(want) == len(trainer.student.trainable())
        for a, b in zip(got, want, strict=True):
            assert float(b.abs().max()) > 0  # every part of the student gets a gradient
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if items is micro[1]:  # two padded lengths: static graphs, then dynamic ones for every later length
            graphs = counters["stats"]["unique_graphs"]
    # the third length, and any later step, compiles nothing new (a recompile per step would add graphs)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    loss_and_grads(trainer, micro[0])
    assert counters["stats"]["unique_graphs"] == graphs
    if trainer.loaded.model.config.model_type == "llama":  # one graph of the whole forward, no graph breaks
        assert graphs == 2 and not counters["graph_break"], dict(counters["graph_break"])


def test_compiler_failure_redoes_the_step_eagerly(tmp_path, monkeypatch):
    """The failing step's loss, gradient norm and updated tensors are the eager step's; one warning."""
    from torch._dynamo.exc import TorchRuntimeError

    loaded = loaded_model("llama")
    store = make_store(tmp_path, loaded, n=4)
    after = {}
    for choice in ("off", "on"):
        trainer = setup(train_cfg(tmp_path, store, compile=choice, batch_size=2, name=f"c-{choice}"), loaded)
        try:
            opt, sched = trainer.optimiser()
            opt = trainer.accelerator.prepare_optimizer(opt, device_placement=False)  # as Trainer.train does
            params = [p for _, p in trainer.student.trainable()]
            group = [[trainer.data[i] for i in m] for m in trainer.epoch_groups(0)[0]]
            with monkeypatch.context() as m:
                m.setattr(torch, "compile", broken_compile(TorchRuntimeError("inductor could not compile")))
                if choice == "on":
                    with pytest.warns(UserWarning, match="compiled training forward failed .*training eagerly"):
                        row = trainer.step(group, 0, opt, sched, params)
                    assert not trainer.compile and trainer.compiled_calls == 1  # tried once, then off
                else:
                    row = trainer.step(group, 0, opt, sched, params)
            assert trainer.stats["samples"] == sum(len(g) for g in group)  # the failed attempt not counted
            after[choice] = (row, {k: v.clone() for k, v in trainer.student.tensors().items()})
            if choice == "on":
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # off from now on: no second attempt, no second warning
                    trainer.step(group, 0, opt, sched, params)
                assert trainer.compiled_calls == 1 and trainer.summary()["compiled"] is False
        finally:
            trainer.student.detach()
    assert after["on"][0]["loss"] == after["off"][0]["loss"]
    assert after["on"][0]["grad_norm"] == after["off"][0]["grad_norm"] > 0
    for k, v in after["off"][1].items():  # the optimiser stepped once, on the eager gradients
        assert torch.equal(after["on"][1][k], v), k
    assert "forward" not in loaded.model.__dict__


def test_other_errors_are_not_swallowed(tmp_path, monkeypatch):
    loaded = loaded_model("llama")
    store = make_store(tmp_path, loaded, n=4)
    trainer = setup(train_cfg(tmp_path, store, compile="on", batch_size=2), loaded)
    try:
        opt, sched = trainer.optimiser()
        opt = trainer.accelerator.prepare_optimizer(opt, device_placement=False)  # as Trainer.train does
        params = [p for _, p in trainer.student.trainable()]
        before = {k: v.clone() for k, v in trainer.student.tensors().items()}
        group = [[trainer.data[i] for i in m] for m in trainer.epoch_groups(0)[0]]
        monkeypatch.setattr(torch, "compile", broken_compile(ValueError("a bug, not a compiler failure")))
        with pytest.raises(ValueError, match="a bug"):
            trainer.step(group, 0, opt, sched, params)
        assert trainer.compile  # not taken for a compiler failure
        assert "forward" not in loaded.model.__dict__
        for k, v in trainer.student.tensors().items():  # the optimiser did not step
            assert torch.equal(v, before[k])
    finally:
        trainer.student.detach()


@pytest.mark.slow
def test_train_student_compiled_and_eager_give_the_same_adapter(tmp_path):
    """``train-student --compile on`` and ``--compile off``: same store and seed, same adapter."""
    loaded = loaded_model("llama")
    store = make_store(tmp_path, loaded, n=6)
    tensors, summaries = {}, {}
    for choice in ("on", "off"):
        run_dir = train_run(train_cfg(tmp_path, store, compile=choice, name=f"c-{choice}", max_steps=3,
                                      batch_size=2, grad_accum=1), loaded=loaded, show_progress=False)
        tensors[choice] = load_file(str(run_dir / "adapter.safetensors"))
        summaries[choice] = json.loads((run_dir / "summary.json").read_text())
    assert summaries["on"]["compiled"] is True and summaries["off"]["compiled"] is False
    assert summaries["on"]["steps"] == summaries["off"]["steps"] == 3
    assert sorted(tensors["on"]) == sorted(tensors["off"])
    for k, v in tensors["off"].items():
        torch.testing.assert_close(tensors["on"][k], v, rtol=1e-4, atol=1e-6)
