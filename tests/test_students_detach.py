"""Students leave the base model exactly as they found it, and evaluate deterministically.

attach -> detach must give back every parameter's requires_grad flag (not "all True" or "all False":
the flags the model had) and logits equal bit for bit to the untouched model's; a LoRA student
reloaded for evaluation must not run PEFT's dropout.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from test_attention import batch_of

from pipeline.attention import ATTN_NAME, route_attention
from pipeline.families import attention_geometry
from pipeline.students import load_student_dir, new_student


@pytest.fixture(params=["llama", "llava_onevision"])
def fam(request):
    """A tiny model routed through MimIC's attention with mixed requires_grad flags; everything
    (flags, routing) is put back afterwards because the models are shared between tests.

    LLaVA-OneVision is here because its projector is where the flags change the CPU kernel: its
    weight is left requiring grad, so a detach that left it frozen would move the logits."""
    f = tiny(request.param)
    model = f.model
    original = [p.requires_grad for p in model.parameters()]
    for i, (name, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i % 2 == 0 or "multi_modal_projector" in name)
    route_attention(model, f.family.attn_implementation(ATTN_NAME))
    yield f
    for layer in model.get_decoder().layers:
        layer.self_attn.__dict__.pop("_mimic_state", None)
    route_attention(model, f.family.attn_implementation("sdpa"))
    for p, flag in zip(model.parameters(), original, strict=True):
        p.requires_grad_(flag)


def flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def randomise(student, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in student.trainable():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["mimic", "live", "lora", "hificl", "mimic-lora"])
def test_detach_restores_flags_and_logits(fam, synthetic_image, method):
    model = fam.model
    batch = batch_of(fam, synthetic_image, "left")
    before_flags = flags(model)
    assert any(before_flags.values()) and not all(before_flags.values())
    before_keys = list(model.state_dict())
    before_modules = [(name, type(m)) for name, m in model.named_modules()]
    before = logits(model, batch)

    base_params = list(model.parameters())
    student = new_student(method, "mimic", model, attention_geometry(model))
    try:
        assert not any(p.requires_grad for p in base_params), "attach freezes every base parameter"
        randomise(student)
        assert (logits(model, batch) - before).abs().max() > 1e-3, "the student must act, or the test shows nothing"
    finally:
        student.detach()

    assert flags(model) == before_flags
    assert list(model.state_dict()) == before_keys
    assert [(name, type(m)) for name, m in model.named_modules()] == before_modules
    assert "peft_config" not in model.__dict__
    assert not any("lora" in type(m).__module__ for m in model.modules())
    assert torch.equal(logits(model, batch), before)


def lora_dropouts(model):
    return [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]


def test_loaded_lora_student_is_deterministic(tmp_path):
    """PEFT builds LoRA layers in training mode whatever the model's mode: a student reloaded for
    evaluation must switch its dropout off, or one adapter scores differently on each run."""
    f = tiny("llama")
    model = f.model
    original = [p.requires_grad for p in model.parameters()]
    geometry = attention_geometry(model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])
    trained = new_student("lora", "mimic", model, geometry)
    try:
        assert trained.training and lora_dropouts(model) and all(d.training for d in lora_dropouts(model))
        assert not model.training, "the student's mode must not switch the base model to training"
        randomise(trained, seed=1)
        trained.save(tmp_path, lora={**trained.config.lora, "dropout": 0.5})
    finally:
        trained.detach()

    student = load_student_dir(tmp_path, model, geometry, "tiny-llama")
    try:
        assert student.config.lora["dropout"] == 0.5
        assert not student.training and not any(d.training for d in lora_dropouts(model))
        torch.manual_seed(0)
        first = logits(model, {"input_ids": ids})
        second = logits(model, {"input_ids": ids})
        assert torch.equal(first, second), "evaluation of a loaded LoRA student must not run dropout"
        with student.disabled():
            base = logits(model, {"input_ids": ids})
        assert (first - base).abs().max() > 1e-3, "the loaded LoRA student must act"

        student.train()  # training again: the dropout is back (and this test can see it)
        assert not torch.equal(logits(model, {"input_ids": ids}), logits(model, {"input_ids": ids}))
        student.eval()
        assert torch.equal(logits(model, {"input_ids": ids}), first)
        assert not model.training
    finally:
        student.detach()
    assert [p.requires_grad for p in model.parameters()] == original
