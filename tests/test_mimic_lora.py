"""MimIC + LoRA at once (pipeline.methods.mimic_lora): the base model at step 0, one learning rate per
part in the optimiser, save / load, kill / resume and evaluation through the ordinary stages.

Detaching (flags, modules, logits bit for bit) is tested with the other methods in
tests/test_students_detach.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_attention import base_logits, batch_of, grad_flags
from test_hificl import (
    evaluate_student,
    interrupted_and_resumed_equals_uninterrupted,
    randomise,
    reloaded_logits,
    routed_copy,
    saved_logits,
    store_and_model,  # noqa: F401 - a module-scoped fixture of this module too
)

from pipeline.config import load_config
from pipeline.families import attention_geometry
from pipeline.students import new_student


@pytest.fixture(scope="module", params=["llama", "idefics2", "qwen2_vl"])
def routed(request):
    return routed_copy(request.param)


def parts(student):
    """{part: [(name, parameter)]} of a mimic-lora student's trainable parameters."""
    named = student.trainable()
    return {part: [(n, p) for n, p in named if n.startswith(f"{part}.")] for part in ("mimic", "lora")}


def test_fresh_student_is_the_base_model_and_acts_once_trained(routed, synthetic_image):
    """v = 0 and LoRA's B = 0: bit-identical to the frozen base, LoRA dropout on (training mode)."""
    fam, model = routed, routed.model
    batch = batch_of(fam, synthetic_image, "left")
    flags = grad_flags(model)
    stock, stock_frozen = base_logits(model, batch)
    with torch.no_grad():
        student = new_student("mimic-lora", "mimic", model, attention_geometry(model))
        try:
            split = parts(student)
            assert len(split["mimic"]) == 3 * len(model.get_decoder().layers)
            assert len(split["lora"]) == 2 * len(student.config.lora["target_modules"]) > 0
            assert len(split["mimic"]) + len(split["lora"]) == len(student.trainable())
            assert all(float(p.abs().max()) == 0 for n, p in split["lora"] if "lora_B" in n)
            assert student.training
            assert torch.equal(model(**batch).logits, stock_frozen), "a fresh student must be the base model"
            randomise(student, seed=5)
            student.eval()  # no LoRA dropout from here: the logits below are comparable
            trained = model(**batch).logits
            with student.disabled():
                assert torch.equal(model(**batch).logits, stock_frozen), "disabled: both parts off"
            only_lora = {n: p.clone() for n, p in split["mimic"]}
            for n, p in split["mimic"]:
                if n.endswith("shift"):
                    p.zero_()
            lora_alone = model(**batch).logits
            for n, p in split["mimic"]:
                p.copy_(only_lora[n])
        finally:
            student.detach()
        assert grad_flags(model) == flags
        assert torch.equal(model(**batch).logits, stock)
    real = batch["attention_mask"].bool()
    assert (trained - stock_frozen)[real].abs().max() > 1e-3
    assert (lora_alone - stock_frozen)[real].abs().max() > 1e-3, "the LoRA part acts on its own"
    assert (trained - lora_alone)[real].abs().max() > 1e-3, "the MimIC part adds to it"


def trainer_for(store, loaded, tmp_path, **options):
    from stages.train_student import TrainConfig, setup

    return setup(load_config(TrainConfig, cache=str(store), runs_dir=str(tmp_path / "runs"), epochs=1, **options),
                 loaded)


@pytest.mark.parametrize("options,mimic_lr,lora_lr", [({}, 5e-3, 1e-3), ({"lr": 1e-2, "lora_lr": 2e-4}, 1e-2, 2e-4)])
def test_optimiser_gives_each_part_its_learning_rate(store_and_model, tmp_path, options, mimic_lr, lora_lr):  # noqa: F811
    store, loaded = store_and_model
    trainer = trainer_for(store, loaded, tmp_path, method="mimic-lora", warmup_ratio=0.0, **options)
    try:
        opt, _ = trainer.optimiser()
        split = parts(trainer.student)
        ids = {part: {id(p) for _, p in named} for part, named in split.items()}
        groups = [(g["initial_lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in opt.param_groups]
        assert [g["lr"] for g in opt.param_groups] == [g["initial_lr"] for g in opt.param_groups]  # no warm-up
        wd = trainer.config.weight_decay
        assert [(lr, decay) for lr, decay, _ in groups] == [(mimic_lr, wd), (mimic_lr, 0.0), (lora_lr, wd), (lora_lr, 0.0)]
        assert groups[0][2] | groups[1][2] == ids["mimic"] and groups[2][2] | groups[3][2] == ids["lora"]
        assert groups[1][2] == {id(p) for n, p in split["mimic"] if n.endswith("f_bias")} != set()
        assert groups[3][2] == set(), "LoRA has no biases here"

        # one AdamW step with unit gradients moves every parameter by its group's lr (Adam's first step)
        before = {n: p.detach().clone() for n, p in trainer.student.trainable()}
        for _, p in trainer.student.trainable():
            p.grad = torch.ones_like(p)
        opt.step()
        for part, lr in (("mimic", mimic_lr), ("lora", lora_lr)):
            for n, p in split[part]:
                moved = (before[n] - p.detach()).abs()
                torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=0.02, atol=0, msg=n)
    finally:
        trainer.student.detach()


def test_single_rate_methods_keep_one_pair_of_groups(store_and_model, tmp_path):  # noqa: F811
    """Methods without ``param_lr`` keep the groups of before (decay, then biases): their checkpoints'
    optimiser states still load."""
    store, loaded = store_and_model
    trainer = trainer_for(store, loaded, tmp_path, method="mimic", lr=3e-3)
    try:
        opt, _ = trainer.optimiser()
        assert [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] == [(3e-3, 1e-3), (3e-3, 0.0)]
    finally:
        trainer.student.detach()


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    fam = routed_copy("llama")
    model, geometry = fam.model, attention_geometry(fam.model)
    student = new_student("mimic-lora", "mimic", model, geometry, base_model="tiny-llama")
    def prepare():
        randomise(student, seed=6)
        student.eval()  # no LoRA dropout: the logits a loaded student must reproduce

    trained = saved_logits(student, prepare, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "mimic-lora" and config["variant"] == "mimic" and config["lora"]["r"] == 16
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert {k.partition(".")[0] for k in tensors} == {"mimic", "lora"}
    assert "mimic.0.shift" in tensors and "lora.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    def inference_mode(loaded):
        assert not loaded.training

    assert torch.equal(reloaded_logits(tmp_path, model, geometry, inference_mode), trained)


def test_killed_run_resumes_to_the_same_adapter_and_evaluates(tmp_path, store_and_model, monkeypatch):  # noqa: F811
    """The four optimiser groups' states survive a kill.

    LoRA's dropout is set to 0 here: a resumed run does not replay the random draws of a run with
    dropout (the DataLoader made on resume draws its seed from the restored generator state; CUDA's
    generator is not saved at all), for ``lora`` as for ``mimic-lora``: a limitation of the trainer's
    checkpoint, not of this method."""
    from pipeline.methods import lora as lora_method

    monkeypatch.setattr(lora_method, "DEFAULTS", {**lora_method.DEFAULTS, "dropout": 0.0})
    store, loaded = store_and_model
    run_dir = interrupted_and_resumed_equals_uninterrupted(tmp_path, store, loaded, monkeypatch, method="mimic-lora")
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (run_config["method"], run_config["lr"], run_config["lora_lr"], run_config["align"]) == \
        ("mimic-lora", 5e-3, 1e-3, "mse")
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    assert float(tensors["mimic.0.shift"].abs().max()) > 0 and float(tensors[
        "lora.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max()) > 0, "both parts trained"
    assert evaluate_student(run_dir, loaded, tmp_path)["adapter"]["method"] == "mimic-lora"
