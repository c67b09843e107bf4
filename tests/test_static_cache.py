"""MimIC with a static KV cache, and log Z2 over exactly the keys sdpa attends to.

On a static-cache prefill transformers passes no mask and Tkv = the cache size > Tq; its sdpa
attention then keeps only the first Tq keys (top-left causal). log Z2 must use the same keys: a
bottom-right causal rule over all Tkv slots counts empty and future slots, and the student's logits
drift from the dynamic cache while the base model's do not.

The key selection is read off transformers' own ``sdpa_attention_forward`` (identity values turn
its output into the attention probabilities), and the model-level checks compare with the dynamic
cache and with the float64 eager reference of test_attention.py; none uses the code's own output.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny
from test_attention import random_heads, reference_logits
from torch import nn
from transformers import StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import pipeline.attention as attention
from pipeline import mimic_cuda
from pipeline.attention import ATTN_NAME, attach_mimic, route_attention
from pipeline.mimic import MimicHeads, MuKernels, masked_log_z2

# ---- the rule, against sdpa itself ------------------------------------------------------------


class _Module(nn.Module):
    """What sdpa_attention_forward reads from an attention module."""

    def __init__(self, groups: int, is_causal: bool):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = is_causal


def sdpa_probe(q, k, mask, scale, is_causal):
    """(visible, lse) as transformers' sdpa attention computes them, in float64: with the identity as
    values its output is the probability matrix p, p > 0 exactly on the keys it attends to, and
    log Z2 = s_ij + m_ij - log p_ij at any visible j (m: the additive mask, 0 where visible)."""
    q, k = q.double(), k.double()
    if mask is not None and mask.is_floating_point():
        mask = mask.double().clamp_min(torch.finfo(torch.float64).min)
    bsz, heads, q_len, _ = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    eye = torch.eye(kv_len, dtype=torch.float64).expand(bsz, n_kv, kv_len, kv_len)
    probs, _ = sdpa_attention_forward(_Module(heads // n_kv, is_causal), q, k, eye, mask, scaling=scale)
    probs = probs.transpose(1, 2)  # (B, H, Tq, Tkv)
    visible = probs > 0
    scores = q @ k.repeat_interleave(heads // n_kv, 1).transpose(-1, -2) * scale
    j = probs.argmax(-1, keepdim=True)
    lse = scores.gather(-1, j)[..., 0] - probs.gather(-1, j)[..., 0].log()
    return visible, lse


def _padded(bsz, q_len, kv_len, offset, pad_left):
    """bool (B, 1, Tq, Tkv): query i at position offset + i sees keys pad_left[b]..offset + i; the
    slots past offset + Tq - 1 are empty (a static cache's tail)."""
    pos = torch.arange(offset, offset + q_len)[:, None]
    mask = (torch.arange(kv_len)[None] <= pos)[None, None].repeat(bsz, 1, 1, 1)
    for b, n in enumerate(pad_left):
        mask[b, ..., :n] = False
    return mask


CASES = {  # name: (Tq, Tkv, mask kind, is_causal); the bool/float masks add padding and empty slots
    "static_prefill_no_mask": (5, 9, None, True),
    "no_cache_no_mask": (6, 6, None, True),
    "decode_no_mask": (1, 9, None, True),
    "bool_mask": (5, 9, "bool", True),
    "float_mask": (5, 9, "float", True),
    "non_causal_no_mask": (5, 9, None, False),
}


def case_tensors(q_len, kv_len, kind):
    g = torch.Generator().manual_seed(q_len * 100 + kv_len)
    q = torch.randn(2, 4, q_len, 8, generator=g)
    k = torch.randn(2, 2, kv_len, 8, generator=g)
    mask = None
    if kind is not None:
        mask = _padded(2, q_len, kv_len, offset=2, pad_left=[0, 2])
        if kind == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return q, k, mask


@pytest.mark.parametrize("name", list(CASES))
def test_log_z2_selects_the_keys_sdpa_attends_to(name):
    q_len, kv_len, kind, is_causal = CASES[name]
    q, k, mask = case_tensors(q_len, kv_len, kind)
    scale = 0.35
    visible, want = sdpa_probe(q, k, mask, scale, is_causal)
    assert visible.any(-1).all()

    for chunk in (2, 256):
        lse, valid = masked_log_z2(q, k, mask, scale, chunk_size=chunk, backend="chunked", is_causal=is_causal)
        assert valid.all()
        torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)

    heads = MimicHeads(4, 8)
    with torch.no_grad():
        heads.shift.normal_(generator=torch.Generator().manual_seed(1))
    f = (q.double() * heads.f_weight.double()[None, :, None]).sum(-1) + heads.f_bias.double()[None, :, None]
    want_shift = (torch.sigmoid(f - want)[..., None] * heads.shift.double()[None, :, None]).transpose(1, 2)
    # every path on this device: auto's choice, the chunked reference and the one-pass path (bool / no mask)
    for path in ("auto", "reference") if kind == "float" else ("auto", "reference", "one_pass"):
        heads.kernels = MuKernels(path=path)
        with torch.no_grad():
            out = heads.add_shift(torch.zeros(2, q_len, 4, 8), q, k, mask, scale, is_causal=is_causal)
            torch.testing.assert_close(out.double(), want_shift, rtol=0, atol=1e-5)
            out = heads(q, k, mask, scale, is_causal=is_causal)
            torch.testing.assert_close(out.double(), want_shift, rtol=0, atol=1e-5)

    if kind == "float":
        return  # the CUDA paths take bool masks or none
    # the CUDA code's rule, run on CPU: the dense key selection and eager flex
    dense = mimic_cuda._visible_keys(mask, q_len, kv_len, torch.device("cpu"), is_causal)
    assert torch.equal(dense.expand(2, 4, q_len, kv_len), visible)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        lse, valid = mimic_cuda.flex_log_z2(q, k, mask, scale, is_causal, MuKernels(compiled={"flex": flex_attention}))
    assert valid.all()
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)


# ---- a tiny Llama with a MimIC student ------------------------------------------------------


@pytest.fixture
def student_llama():
    """The shared tiny Llama routed through MimIC with random non-zero heads; undone afterwards."""
    fam = tiny("llama")
    model = fam.model
    route_attention(model, fam.family.attn_implementation(ATTN_NAME))
    heads = random_heads(model, seed=3)
    handle = attach_mimic(model, heads)
    yield fam, heads
    handle.detach()
    route_attention(model, fam.family.attn_implementation("sdpa"))


def prompts(padding):
    """Two prompts of 7 tokens, or of 7 and 4 tokens left-padded (pad id 0)."""
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25], [1, 6, 10, 14, 18, 22, 26]])
    mask = torch.ones_like(ids)
    if padding == "left":
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@pytest.fixture
def attention_calls(monkeypatch):
    """(Tq, Tkv, mask is None) of every attention call, so a test can show which case it exercised."""
    calls = []
    inner = attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2], attention_mask is None))
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    return calls


@pytest.mark.parametrize("padding", ["none", "left"])
def test_static_cache_generation_matches_dynamic(student_llama, attention_calls, padding):
    fam, _ = student_llama
    ids, mask = prompts(padding)
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        dynamic = fam.model.generate(input_ids=ids, attention_mask=mask, **kw)
        attention_calls.clear()
        static = fam.model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kw)
    q_len, kv_len, no_mask = attention_calls[0]
    assert q_len == ids.shape[1] < kv_len, "the static prefill must see more cache slots than prompt tokens"
    assert no_mask == (padding == "none"), "without padding the static prefill is the no-mask case"
    assert torch.equal(static.sequences, dynamic.sequences)
    assert len(static.logits) == len(dynamic.logits) == 5
    for step_static, step_dynamic in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(step_static, step_dynamic, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_static_cache_prefill_matches_float64_reference(student_llama, attention_calls, padding):
    fam, heads = student_llama
    ids, mask = prompts(padding)
    cache = StaticCache(config=fam.model.config, max_cache_len=ids.shape[1] + 9)
    with torch.no_grad():
        logits = fam.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
    assert attention_calls[0] == (ids.shape[1], ids.shape[1] + 9, padding == "none")
    ref = reference_logits(fam, heads, {"input_ids": ids, "attention_mask": mask})
    real = mask.bool()
    torch.testing.assert_close(logits[real].double(), ref[real], rtol=0, atol=1e-5)
