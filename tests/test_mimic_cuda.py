"""The CUDA paths of the MimIC math, checked on CPU against the chunked path and torch's own
``create_block_mask`` (their GPU timings and gradient checks: bench/log_z2.py, docs/benchmarks.md)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from pipeline import mimic_cuda
from pipeline.mimic import MimicHeads, MuKernels, masked_log_z2


def padded_causal(bsz, q_len, kv_len, lengths, side):
    """bool (B,1,Tq,Tkv): causal with the queries at the end of the keys, key padding on ``side``."""
    mask = (torch.arange(kv_len)[None] <= torch.arange(kv_len - q_len, kv_len)[:, None])[None, None]
    mask = mask.repeat(bsz, 1, 1, 1)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, ..., n:] = False
        else:
            mask[b, ..., : kv_len - n] = False
    return mask


CASES = [(3, 300, 300, "right"), (3, 300, 300, "left"), (2, 7, 400, "left"), (1, 257, 257, None), (2, 1, 300, None),
         (2, 200, 300, None)]  # the last: a static-cache prefill (sdpa's top-left causal rule)


@pytest.mark.parametrize(("bsz", "q_len", "kv_len", "side"), CASES)
def test_block_mask_matches_create_block_mask(bsz, q_len, kv_len, side):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = padded_causal(bsz, q_len, kv_len, [kv_len - 37 * b for b in range(bsz)], side) if side else None
    q_pad, kv_pad = -(-q_len // 128) * 128, -(-kv_len // 128) * 128
    ours = mimic_cuda._flex_block_mask(mask, q_len, kv_len, q_pad, kv_pad, torch.device("cpu"))
    dense = mimic_cuda._visible_keys(mask, q_len, kv_len, torch.device("cpu"))
    dense = mimic_cuda._pad_to(mimic_cuda._pad_to(dense, 3, kv_pad, False), 2, q_pad, False)
    per_batch = dense.shape[0] > 1
    ref = create_block_mask(lambda b, h, q, kv: dense[b if per_batch else 0, 0, q, kv],
                            dense.shape[0] if per_batch else None, None, q_pad, kv_pad, device="cpu")

    def blocks(bm, num, idx):
        n, i = getattr(bm, num), getattr(bm, idx)
        return [sorted(i[b, h, r, : n[b, h, r]].tolist())
                for b in range(n.shape[0]) for h in range(n.shape[1]) for r in range(n.shape[2])]

    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices")):
        assert blocks(ours, num, idx) == blocks(ref, num, idx)


@pytest.mark.parametrize("kv_heads", [2, 8])
@pytest.mark.parametrize("side", ["right", "left", None])
def test_flex_log_z2_forward_matches_chunked(monkeypatch, kv_heads, side):
    """Eager flex on CPU (forward only: flex has no CPU backward) against the chunked path."""
    from torch.nn.attention.flex_attention import flex_attention

    kernels = MuKernels(compiled={"flex": flex_attention})
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 40, 16, generator=g)
    k = torch.randn(3, kv_heads, 40, 16, generator=g)
    mask = padded_causal(3, 40, 40, [40, 31, 22], side) if side else None
    want, want_valid = masked_log_z2(q, k, mask, 0.3, backend="chunked")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        got, valid = mimic_cuda.flex_log_z2(q, k, mask, 0.3, kernels=kernels)
    assert torch.equal(valid, want_valid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kernels.flex_shapes == {mimic_cuda.flex_shape(q, k, mask)}  # the shape is recorded where it runs


@pytest.mark.parametrize("variant", ["mimic", "head_shared"])
@pytest.mark.parametrize(("q_len", "kv_len", "side"), [(20, 20, "right"), (20, 20, "left"), (5, 30, None), (1, 30, None)])
def test_one_pass_matches_reference(variant, q_len, kv_len, side):
    """The one-pass path (what MuKernels.fused compiles on CUDA) against the chunked reference: values and
    gradients in q, k, v and f."""
    torch.manual_seed(0)
    heads = MimicHeads(8, 16, variant, MuKernels(path="reference"))
    torch.nn.init.normal_(heads.shift)
    q = torch.randn(3, 8, q_len, 16, requires_grad=True)
    k = torch.randn(3, 2, kv_len, 16, requires_grad=True)
    mask = padded_causal(3, q_len, kv_len, [kv_len - 3 * b for b in range(3)], side) if side else None
    want = heads(q, k, mask, 0.25)
    heads.kernels = MuKernels(path="one_pass")
    got = heads(q, k, mask, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(want)
    heads.kernels = MuKernels(path="reference")
    grads_want = torch.autograd.grad((heads(q, k, mask, 0.25) * weights).sum(), (q, k, heads.shift, heads.f_weight))
    grads_got = torch.autograd.grad((got * weights).sum(), (q, k, heads.shift, heads.f_weight))
    for a, b_ in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


def fake_cuda(*shape):
    """What ``MuKernels.choose`` reads of a tensor, claiming CUDA: the auto rule's CUDA branch on CPU."""
    return types.SimpleNamespace(is_cuda=True, shape=shape, dtype=torch.bfloat16, requires_grad=False)


def test_auto_choice_is_a_pure_function_of_its_arguments():
    kernels = MuKernels(flex_max_shapes=2)
    long_ = [fake_cuda(1, 4, t, 8) for t in (300, 700, 1100)]  # three padded shapes
    for _ in range(3):  # asking does not use up the budget of compiled shapes
        assert [kernels.choose(q, q, None, "mimic") for q in long_] == ["flex"] * 3
    assert kernels.flex_shapes == set()
    kernels.flex_shapes.update(mimic_cuda.flex_shape(q, q, None) for q in long_[:2])  # two compiled
    assert [kernels.choose(q, q, None, "mimic") for q in long_] == ["flex", "flex", "reference"]
    assert kernels.choose(fake_cuda(1, 4, 80, 8), fake_cuda(1, 4, 80, 8), None, "mimic") == "one_pass"
    float_mask = torch.zeros(1, 1, 300, 300)
    assert kernels.choose(long_[0], long_[0], float_mask, "mimic") == "reference"
    assert kernels.choose(long_[0], long_[0], None, "shift_only") == "reference"
    assert MuKernels(flex_min_scores=10**9).choose(long_[0], long_[0], None, "mimic") == "reference"


def test_auto_backend_stays_chunked_on_cpu():
    q, k = torch.randn(1, 4, 600, 8), torch.randn(1, 4, 600, 8)
    kernels = MuKernels()
    assert kernels.choose(q, k, None, "mimic") == "reference"
    assert kernels.choose(q[:, :, :200], k, None, "mimic") == "one_pass"
    with pytest.raises(ValueError, match="CUDA"):
        masked_log_z2(q, k, None, 0.5, backend="flex")
    with pytest.raises(ValueError, match="CUDA"):
        MuKernels(path="flex").choose(q, k, None, "mimic")
    with pytest.raises(ValueError, match="bool mask"):
        MuKernels(path="one_pass").choose(q, k, torch.zeros(1, 1, 600, 600), "mimic")
    with pytest.raises(ValueError, match="unknown mu path"):
        MuKernels(path="fast")


def test_method_code_keeps_no_module_level_mutable_state():
    """No ``global`` statement and no module-level list / dict / set (literal or call) in the method code:
    every choice is an explicit argument and every cache belongs to an object."""
    import ast
    from pathlib import Path

    import pipeline

    root = Path(pipeline.__file__).parent
    files = [root / "mimic.py", root / "mimic_cuda.py", root / "attention.py", root / "live.py",
             *sorted((root / "methods").glob("*.py"))]
    mutable_calls = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque"}
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        found += [f"{path.name}:{node.lineno} global" for node in ast.walk(tree) if isinstance(node, ast.Global)]
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                    isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None))
                    in mutable_calls):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)[:60]}")
    assert found == [], found
