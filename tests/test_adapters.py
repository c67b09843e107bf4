"""Students on disk: round trip, no base weights, clear errors for foreign files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    AdapterError,
    build_student,
    load_student,
    save_adapter,
)
from pipeline.attention import attach_live, attach_mimic


def tiny_llama(layers=2, heads=4, kv=2, hidden=32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, attn_implementation="mimic")
    return LlamaForCausalLM(cfg).eval()


def randomise(module):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("method,variant", [("mimic", "mimic"), ("mimic", "head_shared"), ("live", "mimic")])
def test_round_trip_identical_logits(tmp_path, method, variant):
    from pipeline.attention import register_mimic_attention

    register_mimic_attention()
    model = tiny_llama()
    cfg = AdapterConfig(method=method, variant=variant, num_layers=2, num_heads=4, head_dim=8, hidden_size=32,
                        base_model="tiny")
    student = build_student(cfg)
    randomise(student)
    attach = attach_mimic if method == "mimic" else attach_live
    ids = torch.randint(0, 64, (2, 6))
    handle = attach(model, student)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle.detach()
    save_adapter(tmp_path, cfg, student.state_dict())
    names = set(load_file(str(tmp_path / ADAPTER_WEIGHTS)))
    base_names = set(model.state_dict())
    assert names and not names & base_names, "adapter file must hold no base weights"
    assert sum(t.numel() for t in load_file(str(tmp_path / ADAPTER_WEIGHTS)).values()) == sum(
        p.numel() for p in student.parameters()
    )
    cfg2, loaded = load_student(tmp_path, (2, 4, 8, 32), "tiny")
    assert cfg2 == cfg
    handle = attach(model, loaded)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    handle.detach()
    assert torch.equal(before, after)


def test_wrong_shapes_name_both(tmp_path):
    cfg = AdapterConfig(method="mimic", num_layers=2, num_heads=4, head_dim=8, hidden_size=32, base_model="model-A")
    save_adapter(tmp_path, cfg, build_student(cfg).state_dict())
    with pytest.raises(AdapterError, match=r"model-A \(layers=2, heads=4.*model-B has layers=30, heads=9"):
        load_student(tmp_path, (30, 9, 64, 576), "model-B")


def test_bad_files(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_student(tmp_path, (2, 4, 8, 32), "m")
    (tmp_path / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_student(tmp_path, (2, 4, 8, 32), "m")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"method": "prefix", "num_layers": 1, "num_heads": 1,
                                                       "head_dim": 1, "hidden_size": 1}))
    with pytest.raises(AdapterError, match="unknown student method 'prefix'"):
        load_student(tmp_path, (1, 1, 1, 1), "m")


def test_mismatched_tensors_rejected(tmp_path):
    cfg = AdapterConfig(method="mimic", num_layers=2, num_heads=4, head_dim=8, hidden_size=32)
    other = AdapterConfig(method="mimic", variant="shift_only", num_layers=2, num_heads=4, head_dim=8, hidden_size=32)
    save_adapter(tmp_path, cfg, build_student(other).state_dict())
    with pytest.raises(AdapterError, match="missing"):
        load_student(tmp_path, (2, 4, 8, 32), "m")
