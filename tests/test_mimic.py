"""The MimIC math against float64 references written here (not against the module itself)."""

from __future__ import annotations

import pytest
import torch

from pipeline.mimic import MimicHeads, masked_log_z2, parameter_count


def naive_lse(q, k, mask, scale):
    """float64 logsumexp over visible keys; q (B,H,T,D), k (B,Hkv,S,D), mask bool (B,1,T,S) or None."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, -1)


def attention(q, k, v, scale):
    """Plain softmax attention for one head group; q (T,D), k (S,D), v (S,D), float64."""
    return torch.softmax(q @ k.T * scale, -1) @ v


def test_decomposition_identity():
    """SA(q,[K_D;K],[V_D;V]) = (1-mu) SA(q,K,V) + mu SA(q,K_D,V_D), mu = Z1/(Z1+Z2) (paper Eq. 4)."""
    g = torch.Generator().manual_seed(0)
    d, n_demo, n_own = 16, 11, 5
    q = torch.randn(1, d, generator=g, dtype=torch.float64)
    k_d, v_d = torch.randn(n_demo, d, generator=g, dtype=torch.float64), torch.randn(n_demo, d, generator=g, dtype=torch.float64)
    k, v = torch.randn(n_own, d, generator=g, dtype=torch.float64), torch.randn(n_own, d, generator=g, dtype=torch.float64)
    scale = d**-0.5
    full = attention(q, torch.cat([k_d, k]), torch.cat([v_d, v]), scale)
    log_z1 = torch.logsumexp(q @ k_d.T * scale, -1)
    # our masked log Z2 for this single query over its own keys (no mask: Tq == 1 sees all keys)
    log_z2, valid = masked_log_z2(q[None, None].float(), k[None, None].float(), None, scale)
    assert valid.all()
    mu = torch.sigmoid(log_z1 - log_z2.double().reshape(1))
    mixed = (1 - mu) * attention(q, k, v, scale) + mu * attention(q, k_d, v_d, scale)
    torch.testing.assert_close(mixed, full, rtol=0, atol=1e-6)
    z1, z2 = torch.exp(log_z1), torch.exp(torch.logsumexp(q @ k.T * scale, -1))
    torch.testing.assert_close(mu, z1 / (z1 + z2), rtol=0, atol=1e-6)


def _padded_causal(bsz, q_len, kv_len, pad_left, pad_right):
    """bool (B,1,Tq,Tkv) causal mask with per-row left/right padding of the keys."""
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    causal = torch.arange(kv_len)[None] <= q_pos
    mask = causal[None, None].repeat(bsz, 1, 1, 1)
    for b in range(bsz):
        mask[b, :, :, : pad_left[b]] = False
        if pad_right[b]:
            mask[b, :, :, kv_len - pad_right[b] :] = False
    return mask


@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_log_z2_masks_gqa_chunks(chunk, kv_heads):
    g = torch.Generator().manual_seed(1)
    bsz, heads, t, d = 3, 4, 9, 8
    q = torch.randn(bsz, heads, t, d, generator=g)
    k = torch.randn(bsz, kv_heads, t, d, generator=g)
    mask = _padded_causal(bsz, t, t, pad_left=[0, 3, 0], pad_right=[0, 0, 2])
    lse, valid = masked_log_z2(q, k, mask, 0.3, chunk_size=chunk)
    ref = naive_lse(q, k, mask, 0.3)
    want_valid = mask.any(-1).expand(bsz, heads, t)
    assert torch.equal(valid, want_valid)
    # left-padded rows 0..2 of sample 1 see no key: mu must vanish there
    assert not valid[1, :, :3].any()
    torch.testing.assert_close(lse[valid].double(), ref[valid], rtol=1e-5, atol=1e-5)


def test_log_z2_none_mask_is_sdpas_top_left_causal():
    """No mask with Tq > 1 and more keys (a static-cache prefill: the slots past the prompt are
    empty): sdpa keeps the first Tq keys, query i seeing keys 0..i, so log Z2 must too
    (tests/test_static_cache.py reads that rule off transformers' sdpa itself)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    lse, valid = masked_log_z2(q, k, None, 0.5)
    assert valid.all()
    mask = torch.zeros(2, 1, 3, 10, dtype=torch.bool)
    for i in range(3):
        mask[..., i, : i + 1] = True
    torch.testing.assert_close(lse.double(), naive_lse(q, k, mask, 0.5), rtol=1e-5, atol=1e-5)
    # a non-causal module without a mask: every key
    lse_all, _ = masked_log_z2(q, k, None, 0.5, is_causal=False)
    torch.testing.assert_close(lse_all.double(), naive_lse(q, k, None, 0.5), rtol=1e-5, atol=1e-5)
    # one query (decoding with a cache) sees every key
    lse1, _ = masked_log_z2(q[:, :, -1:], k, None, 0.5)
    torch.testing.assert_close(lse1.double(), naive_lse(q[:, :, -1:], k, None, 0.5), rtol=1e-5, atol=1e-5)


def test_log_z2_sliding_window_and_additive_mask():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    window = ((j <= i) & (i - j < 3))[None, None]
    lse, _ = masked_log_z2(q, k, window, 1.0)
    torch.testing.assert_close(lse.double(), naive_lse(q, k, window, 1.0), rtol=1e-5, atol=1e-5)
    additive = torch.zeros(1, 1, 8, 8).masked_fill(~window, torch.finfo(torch.float32).min)
    lse_add, valid = masked_log_z2(q, k, additive, 1.0)
    assert valid.all()
    torch.testing.assert_close(lse_add, lse, rtol=1e-5, atol=1e-5)


def test_log_z2_gradients_match_naive():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    mask = _padded_causal(2, 7, 7, pad_left=[2, 0], pad_right=[0, 1])
    lse, valid = masked_log_z2(q, k, mask, 0.4, chunk_size=3)  # chunked and checkpointed
    (lse * valid).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    ref = naive_lse(q, k, mask, 0.4)
    ref.masked_fill(~mask.any(-1).expand_as(ref), 0).sum().backward()
    torch.testing.assert_close(gq, q.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gk, k.grad, rtol=1e-4, atol=1e-5)


def test_heads_shift_formula_and_variants():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 4, 5, 8, generator=g)
    heads = MimicHeads(4, 8, "mimic")
    with torch.no_grad():
        heads.shift.normal_(generator=g)
    out = heads(q, k, None, 0.35)
    assert out.shape == (2, 5, 4, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    log_z2 = naive_lse(q, k, causal, 0.35)
    f = (q.double() * heads.f_weight.double()[None, :, None]).sum(-1) + heads.f_bias.double()[None, :, None]
    mu = torch.sigmoid(f - log_z2)
    want = (mu[..., None] * heads.shift.double()[None, :, None]).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # query-independent: a learned scalar per head; shift-only: mu = 1
    qi = MimicHeads(4, 8, "query_independent")
    with torch.no_grad():
        qi.shift.fill_(1.0)
        qi.gate.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    torch.testing.assert_close(qi(q, k, None, 0.35)[0, 0, :, 0], torch.sigmoid(qi.gate.detach()))
    so = MimicHeads(4, 8, "shift_only")
    with torch.no_grad():
        so.shift.fill_(2.0)
    assert torch.equal(so(q, k, None, 0.35), torch.full((2, 5, 4, 8), 2.0))
    hs = MimicHeads(4, 8, "head_shared")
    assert hs.f_weight.shape == (8,) and hs.f_bias.shape == (1,)


def test_fresh_heads_add_exactly_zero():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)
    assert torch.count_nonzero(MimicHeads(4, 8)(q, k, None, 0.3)) == 0


def test_bad_variant_and_shapes():
    with pytest.raises(ValueError, match="shift_only"):
        MimicHeads(4, 8, "nope")
    with pytest.raises(ValueError, match="4 heads of size 8"):
        MimicHeads(4, 8)(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), None, 1.0)


def test_parameter_count_formula():
    # the paper's 0.26M for Idefics-9B: 32 layers x 32 heads x (2 x 128 + 1)
    assert parameter_count(32, 32, 128) == 263_168
    built = sum(p.numel() for p in MimicHeads(32, 128).parameters()) * 32
    assert built == 263_168
