"""Task Vector and Function Vector (pipeline.vectors, pipeline.methods.task_vector / function_vector).

- The patch acts exactly where and only where intended, on a tiny model of every family: the output
  of decoder layer L at the last prompt position (replaced by TV, added to by FV), nothing before L,
  no earlier position; decode steps of a KV-cache ``generate`` untouched (against a no-cache loop
  written here); the model bit-identical to the base once detached.
- The FV head ranking against a brute-force computation written here: an unrouted copy of the model
  (stock sdpa attention), head outputs read and patched at the input of ``o_proj`` by forward
  pre-hooks, one prompt and one head per forward.
- ``pipeline train-student --method tv|fv`` on a store: the layer chosen is the sweep's best, the save /
  load round trip gives identical logits, a fit killed midway is fitted again to the same tensors, a
  finished one is not redone, and evaluate (with the L2 analysis) runs on it.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from test_attention import batch_of, frozen
from test_hificl import evaluate_student, make_store

from pipeline.adapters import AdapterError, read_adapter_config
from pipeline.attention import ATTN_NAME, register_mimic_attention, route_attention
from pipeline.config import UserError, load_config
from pipeline.families.base import decoder_layers
from pipeline.methods import get_method
from pipeline.methods.base import FitData
from pipeline.prompts import build_prompt
from pipeline.runtime import wrap_model
from pipeline.students import load_student_dir
from pipeline.tasks import load_task
from pipeline.vectors import (
    Vector,
    VectorAttachment,
    causal_indirect_effects,
    function_vector,
    mean_head_outputs,
    mean_layer_states,
    prompt_ends,
    top_heads,
)


def routed_copy(fam):
    fam = fam._replace(model=copy.deepcopy(fam.model))
    register_mimic_attention()
    route_attention(fam.model, fam.family.attn_implementation(ATTN_NAME))
    return fam


def layer_outputs(model, batch, **kwargs):
    """Every decoder layer's output (the residual stream), read by hooks written here; and the logits."""
    outs = {}

    def hook(i):
        def fn(_m, _a, output):
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            logits = model(**batch, **kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(outs))], logits


def attach_vector(model, hidden, layer, mode, seed=0):
    attachment = VectorAttachment(model, Vector(hidden), layer, mode)
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    attachment.load_tensors({"vector": v})
    return attachment, v


# ---- where the patch acts ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_patch_acts_at_one_layer_and_the_last_position_only(tiny_family, synthetic_image, mode):
    fam = tiny_family
    model = fam.model
    batch = batch_of(fam, synthetic_image, "left")  # left padding: every prompt ends at the last position
    with torch.no_grad():
        stock = model(**batch).logits
    with frozen(model):
        base, _ = layer_outputs(model, batch)
    n_layers = len(base)
    layer = 1 if n_layers > 1 else 0
    hidden = base[0].shape[-1]
    attachment, v = attach_vector(model, hidden, layer, mode)
    try:
        patched, _ = layer_outputs(model, batch)
    finally:
        attachment.detach()
    for i in range(layer):
        assert torch.equal(patched[i], base[i]), f"layer {i} before the patched layer changed"
    expected = v.expand(base[layer].shape[0], -1) if mode == "replace" else base[layer][:, -1] + v
    assert torch.equal(patched[layer][:, -1], expected)
    assert torch.equal(patched[layer][:, :-1], base[layer][:, :-1]), "an earlier position changed"
    for i in range(layer + 1, n_layers):
        assert torch.equal(patched[i][:, :-1], base[i][:, :-1]), f"layer {i}: causal attention leaked backwards"
    if layer + 1 < n_layers:
        assert not torch.equal(patched[-1][:, -1], base[-1][:, -1]), "the patch had no effect downstream"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock), "detach must give the base model back"


def test_given_positions_patch_right_padded_prompts_there(synthetic_image):
    fam = tiny("llama")
    model = fam.model
    batch = batch_of(fam, synthetic_image, "right")
    lengths = batch["attention_mask"].sum(1)
    ends = lengths - 1
    with frozen(model):
        base, _ = layer_outputs(model, batch)
    attachment, v = attach_vector(model, base[0].shape[-1], 0, "replace", seed=1)
    try:
        with attachment.at_positions(ends):
            patched, _ = layer_outputs(model, batch)
    finally:
        attachment.detach()
    for b, end in enumerate(ends.tolist()):
        assert torch.equal(patched[0][b, end], v)
        keep = [t for t in range(patched[0].shape[1]) if t != end]
        assert torch.equal(patched[0][b, keep], base[0][b, keep])


def test_generate_patches_the_prompt_once_and_never_a_decode_step():
    """KV-cache greedy generation with a TV equals a loop written here that re-runs the whole sequence
    each step (no cache) with the patch at the prompt's last position only."""
    fam = tiny("llama")
    model = fam.model
    ids = torch.tensor([[1, 7, 12, 30, 41, 9]])
    attachment, _ = attach_vector(model, model.config.hidden_size, 1, "replace", seed=2)
    try:
        with torch.no_grad():
            cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                    do_sample=False, num_beams=1, pad_token_id=0)[0, ids.shape[1]:]
            seq = ids
            for _ in range(5):
                with attachment.at_positions(torch.tensor([ids.shape[1] - 1])):
                    nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], 1)
    finally:
        attachment.detach()
    assert cached.tolist() == seq[0, ids.shape[1]:].tolist()


# ---- Function Vector: head outputs, effects and ranking against brute force -----------------------
@pytest.fixture(scope="module")
def fv_setting():
    """A routed tiny Llama (the project's path), an unrouted copy (the brute force's), antonym prompts."""
    fam = tiny("llama")
    stock = copy.deepcopy(fam.model)
    routed = routed_copy(fam)
    loaded = wrap_model(routed.model, fam.processor, "tiny-llama")
    task = load_task("antonyms")
    support, train = task.split("support"), task.split("train")
    prompts, shuffled = [], []
    for i, query in enumerate(train[:5]):
        demos = support[3 * i : 3 * i + 3]
        answers = [task.demo_answer(d) for d in demos]
        prompts.append(build_prompt(loaded.family, loaded.processor, task.spec, query, demos, answers,
                                    task.demo_answer(query)))
        shuffled.append(build_prompt(loaded.family, loaded.processor, task.spec, query, demos,
                                     answers[1:] + answers[:1], task.demo_answer(query)))
    return loaded, stock, prompts, shuffled


def brute_head_means(model, prompts, n_heads):
    """Mean o_proj input at the last prompt position, one unpadded prompt per forward."""
    layers = decoder_layers(model)
    total = None
    for p in prompts:
        got = {}
        end = p.answer_start - 1

        def grab(i, got=got, end=end):
            def fn(_m, args):
                got[i] = args[0][0, end].reshape(n_heads, -1).clone()
            return fn

        handles = [layer.self_attn.o_proj.register_forward_pre_hook(grab(i)) for i, layer in enumerate(layers)]
        with torch.no_grad():
            model(input_ids=torch.tensor([p.encoded.input_ids]))
        for h in handles:
            h.remove()
        heads = torch.stack([got[i] for i in range(len(layers))])
        total = heads if total is None else total + heads
    return total / len(prompts)


def brute_answer_probability(model, p, patch=None):
    """P(first answer token) at the last prompt position; ``patch`` = (layer, head, value) written into
    the o_proj input there."""
    end, handle = p.answer_start - 1, None
    if patch is not None:
        layer, head, value = patch
        d = value.shape[0]

        def fn(_m, args):
            x = args[0].clone()
            x[0, end, head * d : (head + 1) * d] = value
            return (x,)

        handle = decoder_layers(model)[layer].self_attn.o_proj.register_forward_pre_hook(fn)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p.encoded.input_ids])).logits[0, end]
    if handle is not None:
        handle.remove()
    return float(torch.softmax(logits.double(), -1)[p.encoded.input_ids[p.answer_start]])


def test_head_means_effects_and_ranking_equal_a_brute_force_search(fv_setting):
    loaded, stock, prompts, shuffled = fv_setting
    n_layers, n_heads = stock.config.num_hidden_layers, stock.config.num_attention_heads
    means = mean_head_outputs(loaded, prompts, batch_size=2)  # batched, right-padded, routed attention
    reference = brute_head_means(stock, prompts, n_heads)
    assert means.shape == reference.shape == (n_layers, n_heads, stock.config.hidden_size // n_heads)
    torch.testing.assert_close(means, reference, atol=1e-5, rtol=1e-5)

    cie = causal_indirect_effects(loaded, shuffled, means, rows=7)  # 7 rows: chunks cut across prompts
    brute = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for p in shuffled:
        base = brute_answer_probability(stock, p)
        for layer in range(n_layers):
            for head in range(n_heads):
                brute[layer, head] += brute_answer_probability(stock, p, (layer, head, reference[layer, head])) - base
    brute /= len(shuffled)
    torch.testing.assert_close(cie.double(), brute, atol=1e-6, rtol=1e-4)
    assert float(brute.abs().max()) > 0, "the test model must give the heads some effect"
    ranking = sorted(((layer, head) for layer in range(n_layers) for head in range(n_heads)),
                     key=lambda lh: -brute[lh])
    k = 3
    assert top_heads(cie, k) == ranking[:k]

    # the FV: the chosen heads' means through o_proj, as o_proj computes it on a zero-padded input
    heads = ranking[:k]
    expected = torch.zeros(stock.config.hidden_size)
    for layer, head in heads:
        x = torch.zeros(stock.config.hidden_size)
        d = means.shape[-1]
        x[head * d : (head + 1) * d] = means[layer, head]
        proj = decoder_layers(stock)[layer].self_attn.o_proj
        with torch.no_grad():
            expected += proj(x) - (proj.bias if proj.bias is not None else 0)
    torch.testing.assert_close(function_vector(loaded.model, means, heads), expected, atol=1e-6, rtol=1e-5)


def test_task_vector_states_are_the_mean_layer_outputs(fv_setting):
    loaded, stock, prompts, _ = fv_setting
    states = mean_layer_states(loaded, prompts, batch_size=3)
    total = 0
    for p in prompts:
        outs, _ = layer_outputs(stock, {"input_ids": torch.tensor([p.encoded.input_ids])})
        total = total + torch.stack([o[0, p.answer_start - 1] for o in outs])
    torch.testing.assert_close(states, total / len(prompts), atol=1e-5, rtol=1e-5)
    assert prompt_ends(prompts) == [p.answer_start - 1 for p in prompts]


def test_layer_sweep_picks_the_best_held_out_score_and_ties_go_early(fv_setting):
    loaded = fv_setting[0]
    spec = get_method("tv")
    from pipeline.adapters import AdapterConfig

    config = AdapterConfig(method="tv", num_layers=2, num_heads=4, head_dim=8, hidden_size=32,
                           settings={"layer": 0})
    scores = {0: [0.5, 0.5], 1: [0.2, 0.7]}
    for case, by_layer in scores.items():
        def score(attachment, by_layer=by_layer):
            return by_layer[attachment.layer]

        data = FitData(loaded=loaded, prompts=fv_setting[2], shuffled=[], score=score, batch_size=4,
                       progress=lambda total, desc: _Quiet(), held_out=1)
        result = spec.fit(config, data)
        assert result.settings == {"layer": case} and result.record["sweep"] == by_layer
        assert torch.equal(result.tensors["vector"], mean_layer_states(loaded, fv_setting[2], 4)[case])


class _Quiet:
    def update(self, n):
        pass

    def close(self):
        pass


# ---- the stage: fit, save, load, kill, evaluate ----------------------------------------------------
@pytest.fixture(scope="module")
def store_and_model(tmp_path_factory):
    fam = tiny("llama")
    loaded = wrap_model(copy.deepcopy(fam.model), fam.processor, "tiny-llama")
    return make_store(tmp_path_factory.mktemp("vector-store"), loaded, n=8), loaded


class Killed(Exception):
    pass


def fit_config(store, runs, method, **options):
    from stages.train_student import TrainConfig

    return load_config(TrainConfig, cache=str(store), runs_dir=str(runs), method=method, name="r", **options)


@pytest.mark.parametrize("method", ["tv", "fv"])
def test_fit_saves_loads_resumes_and_evaluates(tmp_path, store_and_model, monkeypatch, method):
    from stages import fitting
    from stages.train_student import run as train_run
    from stages.train_student import setup

    store, loaded = store_and_model
    straight = train_run(fit_config(store, tmp_path / "a", method), loaded=loaded, show_progress=False)
    record = json.loads((straight / "fit.json").read_text())
    config = read_adapter_config(straight)
    assert config.method == method and config.settings["layer"] == record["layer"]
    assert len(record["sweep"]) == config.num_layers and record["held_out_queries"] == 2
    assert record["sweep"][record["layer"]] == max(record["sweep"])
    assert record["fitting_prompts"] == 6
    if method == "fv":
        assert len(config.settings["heads"]) == min(10, config.num_layers * config.num_heads)
        assert top_heads(torch.tensor(record["cie"]), len(config.settings["heads"])) == \
            [tuple(h) for h in config.settings["heads"]]

    # a kill in the middle of the layer sweep: no adapter, no checkpoint; the next run fits the same
    real = fitting.Fitter.fit_data
    calls = {"n": 0}

    def dying(self, show_progress):
        data = real(self, show_progress)
        score = data.score

        def killed_on_second(attachment):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed
            return score(attachment)

        data.score = killed_on_second
        return data

    monkeypatch.setattr(fitting.Fitter, "fit_data", dying)
    with pytest.raises(Killed):
        train_run(fit_config(store, tmp_path / "b", method), loaded=loaded, show_progress=False)
    monkeypatch.setattr(fitting.Fitter, "fit_data", real)
    assert not (tmp_path / "b" / "r" / "adapter.safetensors").exists()
    resumed = train_run(fit_config(store, tmp_path / "b", method), loaded=loaded, show_progress=False)
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys() == {"vector"} and torch.equal(a["vector"], b["vector"])
    assert read_adapter_config(resumed) == read_adapter_config(straight)

    # a finished fit is not redone
    def refit(*_args, **_kwargs):
        raise AssertionError("a finished fit was fitted again")

    monkeypatch.setattr(fitting.Fitter, "fit_data", refit)
    train_run(fit_config(store, tmp_path / "b", method), loaded=loaded, show_progress=False)
    monkeypatch.setattr(fitting.Fitter, "fit_data", real)

    # the student in memory and the one loaded from disk give the same logits
    fitter = setup(fit_config(store, tmp_path / "c", method), loaded)
    from pipeline.rundir import RunDir

    fitter.train(RunDir(fitter.run_dir).checkpoint({}), show_progress=False)
    ids = {"input_ids": torch.tensor([[1, 5, 9, 13, 17]])}
    try:
        with torch.no_grad():
            fitted = loaded.model(**ids).logits
    finally:
        fitter.student.detach()
    student = load_student_dir(straight, loaded.model, loaded.geometry, "tiny-llama")
    try:
        with torch.no_grad():
            again = loaded.model(**ids).logits
    finally:
        student.detach()
    assert torch.equal(fitted, again)
    with torch.no_grad():
        assert not torch.equal(loaded.model(**ids).logits, again), "the vector must change the last position"

    from pipeline.inspection import render_run, run_report

    report = render_run(run_report(straight, tmp_path / "results"))
    assert f"fitted (no training): layer {record['layer']} of {config.num_layers} tried" in report

    result = evaluate_student(straight, loaded, tmp_path)
    assert result["adapter"]["method"] == method and result["parameters"] == config.hidden_size
    assert result["l2"]["mean"]["student"] != result["l2"]["mean"]["zero-shot"]
    assert not any(layer.self_attn.__dict__.get("_mimic_state") for layer in decoder_layers(loaded.model))


def test_refusals_are_one_line(tmp_path, store_and_model):
    from stages.train_student import run as train_run

    store, loaded = store_and_model
    with pytest.raises(UserError, match="--method tv is fitted from a teacher store") as err:
        train_run(fit_config(store, tmp_path, "tv", online=True), loaded=loaded, show_progress=False)
    assert "\n" not in str(err.value)
    from dataclasses import replace

    config = read_adapter_config(train_run(fit_config(store, tmp_path, "tv"), loaded=loaded, show_progress=False))
    for bad in ({"layer": 99}, {"layer": 1.0}, {}, {"layer": 0, "extra": 1}):
        with pytest.raises(AdapterError, match="'settings' of a Task Vector"):
            replace(config, settings=bad)
    fv = replace(config, method="fv", settings={"layer": 0, "heads": [[0, 0]]})
    for bad in ([[0, 99]], [[0]], "0,0"):
        with pytest.raises(AdapterError, match="Function Vector"):
            replace(fv, settings={"layer": 0, "heads": bad})


def test_function_vector_without_demonstrations_is_refused_in_one_line(fv_setting):
    from pipeline.adapters import AdapterConfig

    loaded = fv_setting[0]
    config = AdapterConfig(method="fv", num_layers=2, num_heads=4, head_dim=8, hidden_size=32,
                           settings={"layer": 0, "heads": []})
    data = FitData(loaded=loaded, prompts=fv_setting[2], shuffled=[], score=lambda a: 0.0, batch_size=4,
                   progress=lambda total, desc: _Quiet(), held_out=1)
    with pytest.raises(UserError, match="needs a store of at least 2 shots") as err:
        get_method("fv").fit(config, data)
    assert "\n" not in str(err.value)


def test_derangement_moves_every_demonstration():
    from stages.fitting import derangement

    for n in (2, 3, 5, 8):
        for seed in range(20):
            order = derangement(n, random.Random(seed))
            assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))


def test_n_queries_trains_on_the_first_n_of_the_store(tmp_path, store_and_model):
    from pipeline.store import open_store
    from stages.train_student import setup

    store, loaded = store_and_model
    ids = [int(q) for q in open_store(store).read_array("query_ids")]
    trainer = setup(fit_config(store, tmp_path, "mimic", n_queries=3, max_steps=1), loaded)
    try:
        assert trainer.data.query_index == ids[:3] and len(trainer.data) == 3
        assert trainer.summary()["training_queries"] == 3
    finally:
        trainer.student.detach()
    fitter = setup(fit_config(store, tmp_path, "tv", n_queries=5), loaded)
    assert fitter.data.query_index == ids[:5]  # the training-free methods take the same subset
