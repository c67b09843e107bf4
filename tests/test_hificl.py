"""HiFICL (pipeline.hificl, pipeline.methods.hificl) against independent float64 references.

The references below are written here from the paper's formula — softmax attention over the virtual
keys prepended to the real ones, with an explicit mask over [virtual keys; real keys] — and share no
code with pipeline.hificl. The identity test sets the virtual keys and values to real demonstrations'
post-RoPE keys and values, captured from the model's own attention function, and recovers the ICL
forward's attention output.

HiFICL does not start at the base model: its values start at zero (B_V = 0, as the official code),
so the second term vanishes, but the first is damped by Z2 / (Z1 + Z2) < 1 (exact attention over n
zero-valued keys is not the identity). The tests hold a fresh student to that formula, and the
switched-off and detached student to the base model bit for bit.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny
from safetensors.torch import load_file
from test_attention import base_logits, batch_of, frozen, grad_flags

from pipeline.adapters import AdapterConfig, AdapterError, build_student, read_adapter_config
from pipeline.attention import ATTN_NAME, register_mimic_attention, route_attention
from pipeline.config import CONFIGS_DIR, UserError, load_config
from pipeline.families import attention_geometry
from pipeline.hificl import DEFAULT_RANK, DEFAULT_TOKENS, HificlHeads, parameter_count
from pipeline.methods import get_method
from pipeline.runtime import wrap_model
from pipeline.students import Student, load_student_dir, new_student

# ---- a float64 model whose attention prepends virtual keys ------------------------------------
REF_NAME = "hificl_reference_f64"
VIRTUAL: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """float64 softmax attention over [virtual keys; real keys] where VIRTUAL has the module.

    Rows that see no real key (padding queries) are left as plain attention, the rule of MimIC that
    HiFICL follows; the tests compare real tokens only."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale
    bsz, n_heads, t_q, t_k = scores.shape
    if attention_mask is None:
        visible = torch.ones(t_q, t_k, dtype=torch.bool)
        if kwargs.get("is_causal", getattr(module, "is_causal", True)) and t_q > 1:
            visible = torch.arange(t_k)[None] <= torch.arange(t_q)[:, None]
        visible = visible[None, None]
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., :t_k]
    else:
        visible = attention_mask[..., :t_k] > torch.finfo(attention_mask.dtype).min / 2
        scores = scores + attention_mask[..., :t_k].double()
    visible = visible.expand(bsz, n_heads, t_q, t_k)
    if id(module) in VIRTUAL:
        keys, values = VIRTUAL[id(module)]  # (H, n, D)
        n = keys.shape[1]
        scores = torch.cat([q @ keys.transpose(-1, -2)[None] * scale, scores], -1)
        visible = torch.cat([visible.any(-1, keepdim=True).expand(bsz, n_heads, t_q, n), visible], -1)
        v = torch.cat([values[None].expand(bsz, -1, -1, -1), v], 2)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2).to(query.dtype), None


def reference_logits(fam, heads, batch):
    """Logits of a float64 copy of the model whose decoder self-attention attends to ``heads``'
    virtual keys and values (taken from the parameters, in float64)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF_NAME, reference_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    ref_model = copy.deepcopy(fam.model).double()
    route_attention(ref_model, fam.family.attn_implementation(REF_NAME))
    VIRTUAL.clear()
    for layer, h in zip(ref_model.get_decoder().layers, heads, strict=True):
        a_k, b_k, a_v, b_v = (t.detach().double() for t in (h.key_a, h.key_b, h.value_a, h.value_b))
        VIRTUAL[id(layer.self_attn)] = (a_k @ b_k, a_v @ b_v)
    try:
        with torch.no_grad():
            inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
            return ref_model(**inputs).logits
    finally:
        VIRTUAL.clear()


def randomise(student, seed=0, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in student.trainable():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def routed_copy(name):
    """A deep copy of the cached tiny model, routed through the MimIC attention function (the shared
    instance is never changed)."""
    fam = tiny(name)
    fam = fam._replace(model=copy.deepcopy(fam.model))
    register_mimic_attention()
    route_attention(fam.model, fam.family.attn_implementation(ATTN_NAME))
    return fam


@pytest.fixture(scope="module", params=["llama", "idefics2", "qwen2_vl"])
def routed(request):
    return routed_copy(request.param)


# ---- (a) the model a fresh student gives, the base model when it is off or detached -------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_trained_student_matches_the_float64_reference_and_detaches(routed, synthetic_image, padding_side):
    fam, model = routed, routed.model
    batch = batch_of(fam, synthetic_image, padding_side)
    real = batch["attention_mask"].bool()
    flags = grad_flags(model)
    stock, stock_frozen = base_logits(model, batch)
    with torch.no_grad():
        student = new_student("hificl", "mimic", model, attention_geometry(model))
        try:
            assert not any(grad_flags(model)), "attach freezes the base model"
            randomise(student, seed=1)
            trained = model(**batch).logits
            with student.disabled():
                assert torch.equal(model(**batch).logits, stock_frozen), "switched off: the frozen base, bit for bit"
        finally:
            student.detach()
        assert grad_flags(model) == flags, "detach must restore every requires_grad flag"
        assert torch.equal(model(**batch).logits, stock), "detach must restore the base model exactly"
    ref = reference_logits(fam, student.module, batch)
    assert (trained - stock_frozen)[real].abs().max() > 1e-3, "random HiFICL parameters must change the logits"
    torch.testing.assert_close(trained[real].double(), ref[real], rtol=0, atol=1e-4)


def test_fresh_student_is_the_exact_formula_not_the_base_model(routed, synthetic_image):
    """V_v = 0 at step 0: the logits are those of attention over n zero-valued virtual keys (the
    float64 reference), which damps every head's output by Z2 / (Z1 + Z2): not the base model."""
    fam, model = routed, routed.model
    batch = batch_of(fam, synthetic_image, "left")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        with frozen(model):
            stock_frozen = model(**batch).logits
        torch.manual_seed(0)
        student = new_student("hificl", "mimic", model, attention_geometry(model))
        try:
            assert all(float(h.value_b.abs().max()) == 0 for h in student.module), "V_v = A_V B_V starts at zero"
            fresh = model(**batch).logits
        finally:
            student.detach()
    ref = reference_logits(fam, student.module, batch)
    torch.testing.assert_close(fresh[real].double(), ref[real], rtol=0, atol=1e-4)
    assert (fresh - stock_frozen)[real].abs().max() > 1e-3


# ---- (b) the identity: virtual keys = a demonstration's keys gives the ICL attention -----------
CAPTURE_NAME = "hificl_capture"
CAPTURED: dict = {}


def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    if module is CAPTURED.get("module"):
        CAPTURED["qkvo"] = (query, key, value, out, scaling)
    return out, weights


@pytest.fixture(scope="module")
def icl_forwards():
    """Layer 1 of the tiny Llama (4 query heads, 2 key heads: GQA) on [demonstration; query] for two
    queries of different lengths: the demonstration's post-RoPE keys and values, each query's
    post-RoPE q, k, v and the ICL forward's attention output on the query rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    fam = tiny("llama")
    model = copy.deepcopy(fam.model)
    route_attention(model, fam.family.attn_implementation(CAPTURE_NAME))
    CAPTURED["module"] = model.get_decoder().layers[1].self_attn
    demo = [1, 17, 23, 42, 5, 77, 9]
    queries = [[31, 8, 64, 12], [90, 3, 55, 7, 101, 11]]
    out = []
    with torch.no_grad():
        for query in queries:
            model(input_ids=torch.tensor([demo + query]))
            q, k, v, o, scaling = CAPTURED.pop("qkvo")
            n = len(demo)
            out.append({"demo_k": k[0, :, :n], "demo_v": v[0, :, :n], "q": q[0, :, n:], "k": k[0, :, n:],
                        "v": v[0, :, n:], "icl_out": o[0, n:], "scaling": scaling})
    CAPTURED.clear()
    return out


def pad_batch(parts, side):
    """Stack each sample's (heads, T_b, D) q, k, v into (B, heads, T, D), padded on ``side`` with zeros;
    returns them and the (B, T) bool of real tokens."""
    width = max(p["q"].shape[1] for p in parts)

    def padded(t):
        pad = t.new_zeros(t.shape[0], width - t.shape[1], t.shape[2])
        return torch.cat([pad, t] if side == "left" else [t, pad], 1)

    stacked = {key: torch.stack([padded(p[key]) for p in parts]) for key in ("q", "k", "v")}
    real = torch.stack([padded(torch.ones(1, p["q"].shape[1], 1))[0, :, 0].bool() for p in parts])
    return stacked, real


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_virtual_keys_set_to_a_demonstration_give_the_icl_attention(icl_forwards, side, mask_kind):
    parts = icl_forwards
    torch.testing.assert_close(parts[0]["demo_k"], parts[1]["demo_k"], rtol=0, atol=1e-6)  # one demonstration
    demo_k, demo_v, scaling = parts[0]["demo_k"], parts[0]["demo_v"], parts[0]["scaling"]
    n_kv, n_demo, dim = demo_k.shape
    n_heads = parts[0]["q"].shape[0]
    groups = n_heads // n_kv
    assert groups == 2, "the tiny Llama has grouped-query attention"
    x, real = pad_batch(parts, side)
    bsz, _, width, _ = x["q"].shape
    # the keys each query sees: real, at or before it (sdpa's mask of a padded causal batch)
    pos = real.long().cumsum(-1)
    visible = real[:, None, :] & real[:, :, None] & (pos[:, None, :] <= pos[:, :, None])  # (B, Tq, Tk)
    mask = visible[:, None]
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    k_rep, v_rep = x["k"].repeat_interleave(groups, 1), x["v"].repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(x["q"], k_rep, v_rep, attn_mask=mask, scale=scaling).transpose(1, 2)

    heads = HificlHeads(n_heads, dim, tokens=n_demo, rank=dim)  # full rank: K_v = A_K I
    with torch.no_grad():
        heads.key_a.copy_(demo_k.repeat_interleave(groups, 0))
        heads.key_b.copy_(torch.eye(dim))
        heads.value_a.copy_(demo_v.repeat_interleave(groups, 0))
        heads.value_b.copy_(torch.eye(dim))
        ours = heads.add_shift(out, x["q"], x["k"], mask, scaling, is_causal=True)

    # float64, directly: softmax over [demonstration keys; real keys] with an explicit mask
    keys = torch.cat([demo_k.double()[None].expand(bsz, -1, -1, -1), x["k"].double()], 2).repeat_interleave(groups, 1)
    values = torch.cat([demo_v.double()[None].expand(bsz, -1, -1, -1), x["v"].double()], 2).repeat_interleave(groups, 1)
    full_visible = torch.cat([torch.ones(bsz, width, n_demo, dtype=torch.bool), visible], -1)[:, None]
    scores = (x["q"].double() @ keys.transpose(-1, -2) * scaling).masked_fill(~full_visible, float("-inf"))
    direct = (torch.softmax(scores, -1) @ values).transpose(1, 2)  # (B, T, H, D)
    torch.testing.assert_close(ours[real].double(), direct[real], rtol=0, atol=2e-6)
    # and the ICL forward's own output on the query rows (the model's float32 sdpa)
    for b, p in enumerate(parts):
        torch.testing.assert_close(ours[b][real[b]], p["icl_out"], rtol=0, atol=2e-6)
    # padding queries (no visible real key) are left as sdpa gave them
    torch.testing.assert_close(ours[~real], out[~real], rtol=0, atol=0, equal_nan=True)


def test_log_space_is_stable_for_large_scores():
    """Scores of several hundred (exp overflows float32) still give a finite convex combination."""
    heads = HificlHeads(2, 4, tokens=3, rank=4)
    with torch.no_grad():
        heads.key_b.copy_(torch.eye(4).expand(2, 4, 4))
        heads.value_b.copy_(torch.eye(4).expand(2, 4, 4))
        heads.key_a.mul_(100.0)
    query = torch.randn(1, 2, 5, 4) * 100
    key = torch.randn(1, 1, 5, 4) * 100
    out = torch.randn(1, 5, 2, 4)
    result = heads.add_shift(out, query, key, None, 0.5, is_causal=True)
    assert torch.isfinite(result).all()


# ---- (c) save / load ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return routed_copy("llama")


IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 6, 10, 14, 18, 22]])


def saved_logits(student, prepare, path):
    """``prepare()`` the attached student (set its tensors), then its logits on IDS; it is saved to ``path``
    and detached whatever happens."""
    try:
        prepare()
        with torch.no_grad():
            trained = student.model(input_ids=IDS).logits
        student.save(path)
    finally:
        student.detach()
    return trained


def reloaded_logits(path, model, geometry, check=None):
    """The logits on IDS of the student saved in ``path``, loaded onto ``model`` (``check(loaded)`` first)."""
    loaded = load_student_dir(path, model, geometry, "tiny-llama")
    try:
        if check is not None:
            check(loaded)
        with torch.no_grad():
            return model(input_ids=IDS).logits
    finally:
        loaded.detach()


def test_save_load_round_trip_gives_identical_logits(llama, tmp_path):
    model = llama.model
    geometry = attention_geometry(model)
    student = new_student("hificl", "mimic", model, geometry, base_model="tiny-llama")
    trained = saved_logits(student, lambda: randomise(student, seed=3), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "hificl" and config["lora"] == {"n": DEFAULT_TOKENS, "rank": DEFAULT_RANK}
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert set(tensors) == {f"{i}.{p}" for i in range(2) for p in ("key_a", "key_b", "value_a", "value_b")}
    assert torch.equal(reloaded_logits(tmp_path, model, geometry), trained)


def test_other_sizes_are_rebuilt_from_the_config_and_bad_ones_refused(llama, tmp_path):
    model = llama.model
    geometry = attention_geometry(model)
    fresh = new_student("hificl", "mimic", model, geometry)
    config = replace(fresh.config, lora={"n": 3, "rank": 2})
    fresh.detach()
    student = Student(config, model, get_method("hificl").attach(config, model))

    def prepare():
        assert {n: tuple(p.shape) for n, p in student.trainable()}["0.key_a"] == (4, 3, 2)
        randomise(student, seed=4)

    trained = saved_logits(student, prepare, tmp_path)
    assert torch.equal(reloaded_logits(tmp_path, model, geometry), trained)

    for bad, match in (({"n": 0, "rank": 2}, r"'lora.n' \(virtual tokens per head\) is 0"),
                       ({"n": 3, "rank": 2.5}, r"'lora.rank' .* is 2.5, expected a positive integer"),
                       ({"n": 3}, r"expected exactly the keys \['n', 'rank'\]")):
        with pytest.raises(AdapterError, match=match):
            replace(config, lora=bad)
        data = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "lora": bad}))
        with pytest.raises(AdapterError, match=match) as err:
            read_adapter_config(tmp_path)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="positive integer"):
        HificlHeads(4, 8, tokens=0)


# ---- (d) a killed run resumes to the same adapter -------------------------------------------------
def make_store(root: Path, loaded, n=6):
    from stages.teacher_cache import TeacherCacheConfig
    from stages.teacher_cache import run as cache_run

    cfg = load_config(TeacherCacheConfig, task="antonyms", model=loaded.source.alias, shots=2, n_queries=n,
                      out=str(root / "store.zarr"), shard_size=4, batch_size=1)
    return cache_run(cfg, loaded=loaded, show_progress=False)


@pytest.fixture(scope="module")
def store_and_model(tmp_path_factory):
    """A 6-query teacher store of a private copy of the tiny Llama, and that model loaded."""
    fam = tiny("llama")
    loaded = wrap_model(copy.deepcopy(fam.model), fam.processor, "tiny-llama")
    return make_store(tmp_path_factory.mktemp("hificl-store"), loaded), loaded


class Killed(Exception):
    """Stands for a SIGKILL after a step: the run stops without saving anything more."""


def interrupted_and_resumed_equals_uninterrupted(tmp_path, store, loaded, monkeypatch, **options):
    """Train 12 steps straight; train again with a kill after step 3 (checkpoint at step 2), then resume:
    the two adapters and loss logs must be equal. Returns the uninterrupted run directory."""
    from stages.train_student import TrainConfig
    from stages.train_student import run as train_run
    from stages.trainer import Trainer

    def cfg(runs):
        return load_config(TrainConfig, cache=str(store), runs_dir=str(tmp_path / runs), epochs=4, seed=3407,
                           batch_size=1, grad_accum=2, checkpoint_every=2, name="r", **options)

    straight = train_run(cfg("a"), loaded=loaded, show_progress=False)
    real_step, calls = Trainer.step, {"n": 0}

    def killed_after_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Killed
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", killed_after_3)
    with pytest.raises(Killed):
        train_run(cfg("b"), loaded=loaded, show_progress=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    state = torch.load(tmp_path / "b" / "r" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2, "the kill must leave a checkpoint before the end"
    resumed = train_run(cfg("b"), loaded=loaded, show_progress=False)
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (straight, resumed)]
    assert logs[0] == logs[1] and len(logs[0]) == 12
    return straight


def evaluate_student(run_dir: Path, loaded, root: Path) -> dict:
    """``pipeline evaluate --modes student`` on the run (with the L2 analysis against its store); the
    student's result payload."""
    from stages import evaluate

    out = evaluate.run(evaluate.EvalConfig(runs=(str(run_dir),), modes=("student",), n_queries=4, batch_size=4,
                                           num_beams=1, l2_queries=2, results_dir=str(root / "results"),
                                           device="cpu"), loaded=loaded, show_progress=False)
    result = out["results"][run_dir.name]
    assert result["n"] == 4 and len(result["l2"]["student"]) == 2
    return result


def test_killed_run_resumes_to_the_same_adapter_and_evaluates(tmp_path, store_and_model, monkeypatch):
    store, loaded = store_and_model
    run_dir = interrupted_and_resumed_equals_uninterrupted(tmp_path, store, loaded, monkeypatch, method="hificl")
    assert evaluate_student(run_dir, loaded, tmp_path)["adapter"]["method"] == "hificl"
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run_config["method"] == "hificl" and run_config["lr"] == 5e-3 and run_config["align"] == "none"
    assert read_adapter_config(run_dir).lora == {"n": DEFAULT_TOKENS, "rank": DEFAULT_RANK}
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    assert all(float(tensors[f"{i}.value_b"].abs().max()) > 0 for i in range(2)), "the values trained"
    assert not any(layer.self_attn.__dict__.get("_mimic_state") for layer in loaded.model.get_decoder().layers)


# ---- (e) parameter count -----------------------------------------------------------------------
@pytest.mark.parametrize("layers,heads,head_dim,n,rank", [(2, 4, 8, 8, 8), (3, 5, 16, 2, 3), (1, 1, 4, 1, 1)])
def test_parameter_count_formula_matches_the_built_module(layers, heads, head_dim, n, rank):
    config = AdapterConfig(method="hificl", num_layers=layers, num_heads=heads, head_dim=head_dim,
                           hidden_size=heads * head_dim, lora={"n": n, "rank": rank})
    module = build_student(config)
    assert sum(p.numel() for p in module.parameters()) == parameter_count(layers, heads, head_dim, n, rank)
    assert get_method("hificl").shapes(config)["0.key_a"] == (heads, n, rank)


def test_parameter_count_on_the_idefics_9b_configuration():
    """The paper's 2.2M (n = 8, r = 8 as the official recipe) from the real configuration, on meta."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    data = yaml.safe_load((CONFIGS_DIR / "models" / "idefics-9b.yaml").read_text())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(data["model_type"], **data["architecture"]))
    g = attention_geometry(model)
    settings = get_method("hificl").settings(model, "mimic")
    config = AdapterConfig(method="hificl", num_layers=g.num_layers, num_heads=g.num_heads, head_dim=g.head_dim,
                           hidden_size=g.hidden_size, **settings)
    with torch.device("meta"):
        count = sum(p.numel() for p in build_student(config).parameters())
    assert count == parameter_count(32, 32, 128) == 2_228_224


def test_unknown_settings_are_a_user_error():
    with pytest.raises(UserError):
        AdapterConfig(method="hificl", num_layers=1, num_heads=1, head_dim=4, hidden_size=4, lora={"n": True, "rank": 1})
