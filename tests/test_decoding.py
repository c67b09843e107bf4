"""Compiled decoding (``pipeline.decoding``) gives the eager model's answers.

The reference is transformers' own ``generate`` with its default dynamic cache, uncompiled; the
compiled path must produce the same tokens and logits within float tolerance for the base model and
a MimIC student with random non-zero heads, greedy and with 3 beams (whose cache is reordered in
place), on a left-padded batch; and it must actually have run its decode steps compiled. On the CPU
the compiled function is inductor's C++ code (CUDA graphs exist only on CUDA; the same graph is
replayed there).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny
from test_attention import random_heads
from test_generate_beams import image_prompts

from pipeline.attention import ATTN_NAME, attach_mimic, route_attention
from pipeline.decoding import CompiledDecoding, wants_compile
from pipeline.forward import generate_batch
from pipeline.runtime import wrap_model

NEW = 6
OPTIONS = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def batch(first: int = 1) -> dict:
    """Two prompts of 7 tokens, the second left-padded to 4 real tokens."""
    ids = torch.tensor([[first, 5, 9, 13, 17, 21, 25], [0, 0, 0, 14, 18, 22, 26]])
    mask = (ids != 0).long()
    mask[0] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama():
    """The tiny Llama routed through the MimIC attention function; ``heads`` attached or not per test."""
    fam = tiny("llama")
    route_attention(fam.model, fam.family.attn_implementation(ATTN_NAME))
    yield fam.model
    route_attention(fam.model, fam.family.attn_implementation("sdpa"))


def eager(model, inputs, beams):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, num_beams=beams, **OPTIONS)


def assert_same(got, want):
    assert got.sequences.tolist() == want.sequences.tolist()
    assert len(got.logits) == len(want.logits) == NEW
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("student", [False, True], ids=["base", "mimic"])
def test_compiled_decoding_matches_eager(llama, student):
    handle = attach_mimic(llama, random_heads(llama, seed=3)) if student else None
    try:
        dec = CompiledDecoding(llama, bucket=16)
        for beams in (1, 3):
            want = eager(llama, batch(), beams)
            with torch.no_grad():
                got = dec.generate(batch(), NEW, beams, **OPTIONS)
            assert_same(got, want)
            # another batch of the same shape reuses (and must first clear) the same cache
            want2 = eager(llama, batch(first=2), beams)
            with torch.no_grad():
                got2 = dec.generate(batch(first=2), NEW, beams, **OPTIONS)
            assert_same(got2, want2)
            assert not torch.equal(want2.logits[0], want.logits[0])  # the cache held another batch's keys
        # one cache per (rows, length bucket): 7 + 6 tokens -> 16, rows 2 and 2 x 3 beams
        assert sorted(dec.caches) == [(2, 16), (6, 16)]
        # the decode steps went through the compiled function, the prefill did not
        assert dec.steps["compiled"] >= 4 * (NEW - 1) and dec.steps["eager"] == 4
        assert dec.enabled and "forward" not in llama.__dict__  # the class's forward is back
    finally:
        if handle is not None:
            handle.detach()


def broken_compile(error: Exception):
    """A ``torch.compile`` whose compiled function raises ``error`` when called."""
    def compile_(fn, **_):
        def run(*a, **k):
            raise error
        return run
    return compile_


def test_compiler_failure_falls_back_to_eager(llama, monkeypatch):
    from torch._dynamo.exc import TorchRuntimeError

    monkeypatch.setattr(torch, "compile", broken_compile(TorchRuntimeError("inductor could not compile")))
    dec = CompiledDecoding(llama)
    want = eager(llama, batch(), 3)
    with pytest.warns(UserWarning, match="compiled decoding failed .*generating eagerly"):
        with torch.no_grad():
            got = dec.generate(batch(), NEW, 3, **OPTIONS)
    assert_same(got, want)
    assert not dec.enabled and "forward" not in llama.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # off from now on: no second attempt, no second warning
        with torch.no_grad():
            assert_same(dec.generate(batch(), NEW, 3, **OPTIONS), want)


def test_other_errors_are_not_swallowed(llama, monkeypatch):
    monkeypatch.setattr(torch, "compile", broken_compile(ValueError("a bug, not a compiler failure")))
    with pytest.raises(ValueError, match="a bug"), torch.no_grad():
        CompiledDecoding(llama).generate(batch(), NEW, 1, **OPTIONS)
    assert "forward" not in llama.__dict__


def test_vlm_generate_batch_compiled_matches_eager():
    """The evaluate path (generate_batch) on a tiny Idefics2 with images, 3 beams, stop strings."""
    fam = tiny("idefics2")
    loaded = wrap_model(fam.model, fam.processor, "tiny-idefics2")
    prompts = image_prompts(loaded, shots=1)
    want = generate_batch(loaded, prompts, 5, 3)
    loaded.decoding = CompiledDecoding(loaded.model)
    try:
        got = generate_batch(loaded, prompts, 5, 3)
        assert loaded.decoding.steps["compiled"] > 0 and loaded.decoding.enabled
    finally:
        loaded.decoding = None
    assert got == want


def test_wants_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [wants_compile(c, cpu) for c in ("auto", "on", "off")] == [False, True, False]
    assert [wants_compile(c, cuda) for c in ("auto", "on", "off")] == [True, True, False]
    assert wants_compile("auto", cuda, 999, 1000) is False and wants_compile("auto", cuda, 1000, 1000) is True
    assert wants_compile("on", cpu, 1, 1000) is True  # on: whatever the amount
    with pytest.raises(ValueError, match="one of auto, on, off"):
        wants_compile("yes", cpu)
