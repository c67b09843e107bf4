"""Students on disk: round trip, no base weights, clear errors for foreign files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    AdapterError,
    build_student,
    load_student,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from pipeline.attention import attach_mimic
from pipeline.methods.live import attach_live


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


# --- damaged or foreign files: one-line AdapterError naming the file and what is wrong -------------

GEOMETRY = (2, 4, 8, 32)


def saved_mimic(directory, variant="mimic"):
    cfg = AdapterConfig(method="mimic", variant=variant, num_layers=2, num_heads=4, head_dim=8, hidden_size=32)
    student = build_student(cfg)
    randomise(student)
    save_adapter(directory, cfg, student.state_dict())
    return directory / ADAPTER_WEIGHTS


def read_copy(path):
    """The tensors of a safetensors file, copied out of its memory map (the file is rewritten next)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def rewrite_tensors(path, change):
    tensors = read_copy(path)
    change(tensors)
    save_file(tensors, str(path))


class RunsOnUnpickle:
    """Unpickling this object creates ``marker`` (proof that a pickle was executed)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fault_nan(w):
    rewrite_tensors(w, lambda t: t.__setitem__("1.f_weight", torch.full((4, 8), float("nan"))))
    return r"tensor '1\.f_weight' has 32 non-finite values \(NaN or inf\) of 32"


def fault_inf(w):
    def change(t):
        t["0.shift"][2, 3] = float("inf")
    rewrite_tensors(w, change)
    return r"tensor '0\.shift' has 1 non-finite values"


def fault_int64(w):
    rewrite_tensors(w, lambda t: t.__setitem__("0.f_bias", torch.arange(4)))
    return r"tensor '0\.f_bias' has dtype int64, expected a floating-point dtype"


def fault_truncated(w):
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    return r"is not a readable safetensors file \(.*\): it is truncated or damaged"


def fault_empty(w):
    w.write_bytes(b"")
    return r"is not a readable safetensors file"


def fault_torch_save(w):
    torch.save(read_copy(w), w)
    return r"is a zip archive \(torch\.save format, which holds pickles\), not a safetensors file; it was not loaded"


def fault_renamed_key(w):
    rewrite_tensors(w, lambda t: t.__setitem__("0.bias", t.pop("0.f_bias")))
    return r"missing \['0\.f_bias'\], unexpected \['0\.bias'\]"


def fault_extra_key(w):
    rewrite_tensors(w, lambda t: t.__setitem__("base.lm_head.weight", torch.zeros(2, 2)))
    return r"missing \[\], unexpected \['base\.lm_head\.weight'\]"


def fault_shape(w):
    rewrite_tensors(w, lambda t: t.__setitem__("1.shift", torch.zeros(4, 9)))
    return r"tensor '1\.shift' has shape \[4, 9\], but adapter_config\.json .* expects \[4, 8\]"


@pytest.mark.parametrize("fault", [fault_nan, fault_inf, fault_int64, fault_truncated, fault_empty, fault_torch_save,
                                   fault_renamed_key, fault_extra_key, fault_shape])
def test_damaged_weights_are_refused_naming_file_and_problem(tmp_path, fault):
    weights = saved_mimic(tmp_path)
    pattern = fault(weights)
    with pytest.raises(AdapterError, match=pattern) as err:
        load_student(tmp_path, GEOMETRY, "m")
    message = str(err.value)
    assert str(weights) in message and "\n" not in message


def test_pickle_renamed_to_safetensors_is_never_executed(tmp_path):
    weights = saved_mimic(tmp_path)
    marker = tmp_path / "unpickled"
    weights.write_bytes(pickle.dumps({"0.shift": RunsOnUnpickle(marker)}))
    assert not marker.exists()
    with pytest.raises(AdapterError, match=r"is a Python pickle, not a safetensors file; it was not loaded"):
        load_student(tmp_path, GEOMETRY, "m")
    with pytest.raises(AdapterError, match="Python pickle"):
        read_adapter_tensors(tmp_path)
    assert not marker.exists(), "the pickle was executed"
    pickle.loads(weights.read_bytes())  # the same bytes do run code when unpickled: the check above can fail
    assert marker.exists()


def test_config_variant_disagreeing_with_tensor_shapes(tmp_path):
    """Tensors of a full MimIC student under a config that says head_shared: same names, other shapes."""
    saved_mimic(tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "variant": "head_shared"}))
    with pytest.raises(AdapterError, match=r"tensor '0\.f_weight' has shape \[4, 8\], but adapter_config\.json "
                                           r"\(mimic/head_shared.*expects \[8\]"):
        load_student(tmp_path, GEOMETRY, "m")


@pytest.mark.parametrize("change,pattern", [
    ({"num_layers": "x"}, r"'num_layers' is 'x', expected a positive integer"),
    ({"num_heads": 0}, r"'num_heads' is 0, expected a positive integer"),
    ({"head_dim": 8.0}, r"'head_dim' is 8\.0, expected a positive integer"),
    ({"hidden_size": True}, r"'hidden_size' is True, expected a positive integer"),
    ({"method": 3}, r"unknown student method 3"),
    ({"variant": ["mimic"]}, r"unknown MimIC variant \['mimic'\]"),
    ({"store_fingerprint": "cache.zarr"}, r"'store_fingerprint' is 'cache\.zarr', expected a mapping"),
    ({"base_model": None}, r"'base_model' is None, expected a string"),
    ({"format_version": "1"}, r"'format_version' is '1', expected an integer"),
    ({"format_version": 99}, r"has format_version 99; this code reads up to 1"),
    ({"colour": "red"}, r"has unknown keys \['colour'\]"),
    ({"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 2, "target_modules": ["a"]}},
     r"'lora\.dropout' is 2, expected a number in \[0, 1\)"),
    ({"method": "lora", "lora": {"r": 4}}, r"'lora' misses \['alpha', 'dropout', 'target_modules'\]"),
])
def test_malformed_config_is_one_line(tmp_path, change, pattern):
    saved_mimic(tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(AdapterError, match=pattern) as err:
        load_student(tmp_path, GEOMETRY, "m")
    assert str(tmp_path / ADAPTER_CONFIG) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text,pattern", [
    ("[1, 2]", r"holds a JSON list, expected an object of adapter settings"),
    (json.dumps({"method": "mimic", "num_layers": 2}), r"misses the keys \['num_heads', 'head_dim', 'hidden_size'\]"),
])
def test_config_of_wrong_structure(tmp_path, text, pattern):
    saved_mimic(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(AdapterError, match=pattern):
        read_adapter_config(tmp_path)


def test_lora_tensor_sizes_checked_against_the_model(tmp_path):
    """LoRA: names and rank from the config, in/out sizes from the model's projections."""
    model = tiny_llama()
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    cfg = AdapterConfig(method="lora", num_layers=2, num_heads=4, head_dim=8, hidden_size=32,
                        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets})
    # k_proj maps 32 -> 2 kv heads x 8 = 16; a lora_B of 32 rows was made for another model
    tensors = {f"{t}.lora_A.weight": torch.zeros(4, 32) for t in targets}
    tensors |= {f"{targets[0]}.lora_B.weight": torch.zeros(32, 4), f"{targets[1]}.lora_B.weight": torch.zeros(32, 4)}
    save_adapter(tmp_path, cfg, tensors)
    assert set(read_adapter_tensors(tmp_path, cfg)) == set(tensors)  # without the model: names and rank only
    with pytest.raises(AdapterError, match=r"k_proj\.lora_B\.weight' has shape \[32, 4\], .* expects \[16, 4\]"):
        read_adapter_tensors(tmp_path, cfg, model)
    tensors[f"{targets[1]}.lora_B.weight"] = torch.zeros(16, 4)
    save_adapter(tmp_path, cfg, tensors)
    assert set(read_adapter_tensors(tmp_path, cfg, model)) == set(tensors)
    other = AdapterConfig(method="lora", num_layers=2, num_heads=4, head_dim=8, hidden_size=32,
                          lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["model.vision.proj"]})
    with pytest.raises(AdapterError, match="LoRA target module 'model.vision.proj' is not in the model"):
        read_adapter_tensors(tmp_path, other, model)
