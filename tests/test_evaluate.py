"""`pipeline evaluate` end to end on a tiny random Llama: stage 1 -> stage 2 -> evaluate.

The models are deep copies of the cached tiny models, so nothing here changes the shared instances
(attention routing, attached students, frozen parameters).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny

from pipeline.adapters import AdapterConfig, build_student, save_adapter
from pipeline.config import ConfigError, UserError
from pipeline.prompts import build_prompt
from pipeline.results import TABLE_MARK
from pipeline.runtime import wrap_model
from pipeline.tasks import Example, Task, TaskSpec, load_task
from pipeline.tasks.sampling import sample_demonstrations
from stages import evaluate, teacher_cache, train_student

TASK, SHOTS, N_EVAL = "antonyms", 2, 6


def fresh_loaded(name: str = "tiny-llama"):
    tf = tiny("llama")
    return wrap_model(copy.deepcopy(tf.model), tf.processor, name)


def make_trained(root: Path, n_queries: int) -> tuple[Path, Path, Path]:
    """A teacher store and a 2-step MimIC run of the tiny Llama on the antonyms task under ``root``:
    (root, run directory, store)."""
    loaded = fresh_loaded()
    store = teacher_cache.run(teacher_cache.TeacherCacheConfig(
        task=TASK, model="tiny-llama", out=str(root / "cache.zarr"), shots=SHOTS, n_queries=n_queries, device="cpu",
    ), loaded=loaded, show_progress=False)
    run_dir = train_student.run(train_student.TrainConfig(
        cache=str(store), max_steps=2, runs_dir=str(root / "runs"), device="cpu", name="tiny-mimic",
    ), loaded=loaded, show_progress=False)
    return root, Path(run_dir), Path(store)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_trained(tmp_path_factory.mktemp("evaluate"), n_queries=6)


def eval_config(root: Path, **kw) -> evaluate.EvalConfig:
    base = dict(runs_dir=str(root / "runs"), n_queries=N_EVAL, batch_size=4, l2_queries=4,
                results_dir=str(root / "results"), device="cpu")
    return evaluate.EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def evaluated(trained):
    root, run_dir, store = trained
    loaded = fresh_loaded()
    out = evaluate.run(eval_config(root), loaded=loaded, show_progress=False)  # the run is found by default
    return root, run_dir, loaded, out


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_end_to_end_files_and_table(evaluated):
    root, run_dir, _, out = evaluated
    folder = root / "results" / TASK
    assert out["task"] == TASK
    names = {"zero-shot", f"icl-{SHOTS}shot", run_dir.name}
    assert set(out["results"]) == names
    for name in names:
        data = load_json(folder / f"{name}.json")
        assert data["task"] == TASK and data["n"] == N_EVAL and len(data["records"]) == N_EVAL
        assert not (folder / f"{name}.partial.jsonl").exists()
        record = data["records"][0]
        assert {"id", "question", "prediction", "generation", "answers", "score", "latency_ms",
                "prompt_tokens"} <= set(record)
        # exact match, recomputed independently: case-insensitive equality with the reference
        expect = [100.0 * (r["prediction"].strip().lower() in [a.lower() for a in r["answers"]])
                  for r in data["records"]]
        assert [r["score"] for r in data["records"]] == expect
        assert data["score"] == pytest.approx(sum(expect) / N_EVAL)
        assert data["mean_latency_ms"] > 0
    table = out["table"]
    # the file is the returned table behind one marker line (the file is ours to rewrite)
    assert (folder / "table.md").read_text() == TABLE_MARK + "\n" + table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [r.split("|")[1].strip() for r in rows] == ["zero-shot", f"{SHOTS}-shot ICL", f"student {run_dir.name}"]
    assert all(r.split("|")[3].strip() == str(N_EVAL) for r in rows)
    assert rows[1].split("|")[6].strip() == "1.00x"


def test_icl_prompt_holds_k_demonstrations(evaluated):
    root, _, loaded, out = evaluated
    zero, icl = out["results"]["zero-shot"], out["results"][f"icl-{SHOTS}shot"]
    assert icl["mean_prompt_tokens"] > zero["mean_prompt_tokens"]
    task = load_task(TASK)
    support = {e.id: e for e in task.split("support")}
    tok = loaded.processor
    for z, r, query in zip(zero["records"], icl["records"], task.split("eval")[:N_EVAL], strict=True):
        assert z["id"] == r["id"] == query.id
        want = [task.split("support")[j].id for j in sample_demonstrations(task.split("support"), query, SHOTS, 3407)]
        assert r["demo_ids"] == want and query.id not in want
        # independent count: each demonstration is "<input> -> <answer>\n" tokenised on its own
        demo_tokens = sum(len(tok(f"{support[d].question} -> {support[d].answers[0]}\n",
                                  add_special_tokens=False)["input_ids"]) for d in want)
        assert r["prompt_tokens"] == z["prompt_tokens"] + demo_tokens


def test_batched_generation_matches_unpadded_generate(evaluated):
    """Left-padded batched beam search gives what one unpadded generate call gives."""
    _, _, loaded, out = evaluated
    task = load_task(TASK)
    tok = loaded.processor
    for record, query in zip(out["results"]["zero-shot"]["records"][:2], task.split("eval"), strict=False):
        prompt = build_prompt(loaded.family, tok, task.spec, query, [], [], None)
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            gen = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3,
                                        max_new_tokens=task.spec.max_new_tokens, do_sample=False,
                                        stop_strings=["\n", "Question:", "Caption:"], tokenizer=tok,
                                        pad_token_id=tok.pad_token_id)
        assert record["generation"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        assert record["prompt_tokens"] == ids.shape[1]


def test_l2_is_measured_on_held_out_queries_against_a_teacher_run_here(evaluated):
    """The L2 analysis against an independent computation: for each of the first 4 evaluated (held-out)
    queries, the 2-shot ICL prompt the store's sampler picks, a separate forward with hooks written here
    (teacher: student off; student: attached), per-layer ||h_student - h_teacher|| averaged over tokens."""
    from pipeline.students import load_student_dir
    from stages.evaluate import eval_examples

    root, run_dir, loaded, out = evaluated
    l2 = out["results"][run_dir.name]["l2"]
    task = load_task(TASK)
    queries = eval_examples(task, eval_config(root))[:4]
    train_ids = {e.id for e in task.split("train")}
    assert not {q.id for q in queries} & train_ids  # held out: never a training query
    support = task.split("support")
    layers = loaded.model.get_decoder().layers

    def mlp_states(prompt):
        got = {}
        hooks = [layer.mlp.register_forward_hook(lambda _m, _a, o, i=i: got.__setitem__(i, o))
                 for i, layer in enumerate(layers)]
        batch = loaded.family.collate([prompt.encoded], loaded.processor, "right")
        with torch.no_grad():
            loaded.model(**batch, use_cache=False)
        for h in hooks:
            h.remove()
        return torch.stack([got[i][0, prompt.span_start :].double() for i in range(len(layers))], dim=1)

    student = load_student_dir(run_dir, loaded.model, loaded.geometry, "tiny-llama")
    try:
        sums, tokens = {"zero-shot": 0, "student": 0}, 0
        for q in queries:
            demos = [support[i] for i in sample_demonstrations(support, q, SHOTS, 3407)]
            answer = task.demo_answer(q)
            teacher_prompt = build_prompt(loaded.family, loaded.processor, task.spec, q, demos,
                                          [task.demo_answer(d) for d in demos], answer)
            alone = build_prompt(loaded.family, loaded.processor, task.spec, q, [], [], answer)
            with student.disabled():
                teacher, zero = mlp_states(teacher_prompt), mlp_states(alone)
            mine = mlp_states(alone)
            sums["zero-shot"] = sums["zero-shot"] + (zero - teacher).norm(dim=-1).sum(0)
            sums["student"] = sums["student"] + (mine - teacher).norm(dim=-1).sum(0)
            tokens += teacher.shape[0]
    finally:
        student.detach()
    assert l2["queries"] == 4 and "held out" in l2["queries_from"]
    for name in ("zero-shot", "student"):
        torch.testing.assert_close(torch.tensor(l2[name], dtype=torch.float64), sums[name] / tokens, rtol=1e-4, atol=1e-5)


def test_l2_analysis(evaluated):
    root, run_dir, _, out = evaluated
    l2 = out["results"][run_dir.name]["l2"]
    assert len(l2["zero-shot"]) == len(l2["student"]) == 2 and l2["queries"] == 4
    assert all(v > 0 for v in l2["zero-shot"] + l2["student"])
    assert l2["zero-shot"] != l2["student"]  # the trained student moves the states
    assert (root / "results" / TASK / f"l2_{run_dir.name}.png").stat().st_size > 0


def count_generate(model, monkeypatch) -> list[int]:
    calls = []
    original = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return calls


def test_rerun_skips_done_samples(evaluated, monkeypatch):
    root, run_dir, loaded, out = evaluated
    folder = root / "results" / TASK
    calls = count_generate(loaded.model, monkeypatch)
    again = evaluate.run(eval_config(root, runs=(str(run_dir),)), loaded=loaded, show_progress=False)
    assert calls == []
    assert again["table"] == out["table"]
    # an interrupted zero-shot run: 2 records in the partial file, no final JSON
    saved = load_json(folder / "zero-shot.json")
    (folder / "zero-shot.json").unlink()
    header = {"fingerprint": saved["fingerprint"]}
    partial = folder / "zero-shot.partial.jsonl"
    partial.write_text("".join(json.dumps(x) + "\n" for x in [header, *saved["records"][:2]]) + '{"id": "torn')
    resumed = evaluate.run(eval_config(root, modes=("zero-shot",)), loaded=loaded, show_progress=False)
    assert sum(calls) == N_EVAL - 2 + 1  # 4 missing queries, plus the 1-prompt warm-up
    assert not partial.exists()
    records = resumed["results"]["zero-shot"]["records"]
    assert [r["generation"] for r in records] == [r["generation"] for r in saved["records"]]
    assert records[0]["latency_ms"] == saved["records"][0]["latency_ms"]  # reused, not regenerated


def test_adapter_for_other_geometry(trained, tmp_path):
    root, _, _ = trained
    config = AdapterConfig(method="mimic", num_layers=3, num_heads=4, head_dim=8, hidden_size=32, base_model="other")
    save_adapter(tmp_path / "other", config, build_student(config).state_dict())
    with pytest.raises(UserError, match=r"adapter was made for other \(layers=3.*but the model tiny-llama has layers=2"):
        evaluate.run(eval_config(root, runs=(str(tmp_path / "other"),), task=TASK, results_dir=str(tmp_path)),
                     loaded=fresh_loaded(), show_progress=False)
    assert not (tmp_path / TASK / "zero-shot.json").exists()  # refused before generating anything


def test_results_of_another_task_are_not_mixed(evaluated, tmp_path):
    root, _, loaded, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    foreign = load_json(results / TASK / "zero-shot.json")
    foreign["task"] = "plurals"
    (results / TASK / "plurals-zero-shot.json").write_text(json.dumps(foreign))
    with pytest.raises(UserError, match="holds results of task 'plurals', not 'antonyms'"):
        evaluate.run(eval_config(root, modes=("zero-shot",), task=TASK, results_dir=str(results)),
                     loaded=loaded, show_progress=False)


def test_results_of_a_newer_schema_are_refused_not_misread(evaluated, tmp_path):
    root, _, loaded, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    saved = load_json(results / TASK / "zero-shot.json")
    assert saved["results_schema_version"] == 1
    saved["results_schema_version"] = 2
    (results / TASK / "zero-shot.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"zero-shot.json has results_schema_version 2; this code reads up to 1"):
        evaluate.run(eval_config(root, modes=("zero-shot",), task=TASK, results_dir=str(results)),
                     loaded=loaded, show_progress=False)


def test_unscorable_queries_are_refused():
    spec = TaskSpec("t", "text", "exact_match", "{question} ->")
    no_answers = Task(spec, {"eval": lambda: [Example("a", "hot", ())]})
    empty = Task(spec, {"eval": lambda: []})
    config = evaluate.EvalConfig()
    with pytest.raises(UserError, match="no reference answers"):
        evaluate.eval_examples(no_answers, config)
    with pytest.raises(UserError, match="has no examples"):
        evaluate.eval_examples(empty, config)


def test_missing_java_stops_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    config = evaluate.EvalConfig(task="shapes_caption", modes=("zero-shot",), model="no-such-model",
                                 results_dir=str(tmp_path))
    with pytest.raises(UserError, match="CIDEr needs Java"):
        evaluate.run(config, show_progress=False)


def test_config_errors_are_collected(tmp_path):
    config = evaluate.EvalConfig(modes=("zero-shot", "few-shot"), num_beams=0, runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"(?s)'modes'.*few-shot.*'num_beams'"):
        evaluate.run(config, show_progress=False)
    with pytest.raises(UserError, match="no student run under"):
        evaluate.run(evaluate.EvalConfig(runs_dir=str(tmp_path)), show_progress=False)


def test_multimodal_idefics2_shapes_vqa(tmp_path):
    """The same three modes on a tiny Idefics2 with images (synthetic shapes VQA, 1 shot)."""
    tf = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-idefics2")
    store = teacher_cache.run(teacher_cache.TeacherCacheConfig(
        task="shapes_vqa", model="tiny-idefics2", out=str(tmp_path / "c.zarr"), shots=1, n_queries=2, device="cpu",
    ), loaded=loaded, show_progress=False)
    train_student.run(train_student.TrainConfig(cache=str(store), max_steps=1, runs_dir=str(tmp_path / "runs"),
                                                device="cpu"), loaded=loaded, show_progress=False)
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-idefics2")
    out = evaluate.run(eval_config(tmp_path, n_queries=2, batch_size=2, l2_queries=2), loaded=loaded,
                       show_progress=False)
    assert out["task"] == "shapes_vqa"
    results = out["results"]
    assert set(results) == {"zero-shot", "icl-1shot", "c-mimic"}
    assert results["icl-1shot"]["mean_prompt_tokens"] > results["zero-shot"]["mean_prompt_tokens"]
    assert results["zero-shot"]["metric"] == "vqa_accuracy"
    assert len(results["c-mimic"]["l2"]["student"]) == 2
    assert len([ln for ln in out["table"].splitlines() if ln.startswith("| ") and "mode" not in ln]) == 3


def test_l2_skipped_without_store(evaluated, tmp_path):
    root, run_dir, loaded, _ = evaluated
    moved = tmp_path / "moved-run"
    shutil.copytree(run_dir, moved)
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace(f"cache: {root / 'cache.zarr'}", f"cache: {tmp_path / 'gone.zarr'}"))
    out = evaluate.run(eval_config(root, runs=(str(moved),), modes=("student",), n_queries=2,
                                   results_dir=str(tmp_path / "results")), loaded=loaded, show_progress=False)
    assert "does not exist" in out["results"]["moved-run"]["l2"]["skipped"]
    assert not (tmp_path / "results" / TASK / "l2_moved-run.png").exists()


def test_report_to_tensorboard_logs_each_results_score(evaluated, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, run_dir, loaded, out = evaluated
    shutil.copytree(root / "results", tmp_path / "results")  # the records are reused: nothing is generated
    again = evaluate.run(eval_config(root, runs=(str(run_dir),), results_dir=str(tmp_path / "results"),
                                     report_to="tensorboard"), loaded=loaded, show_progress=False)
    events = EventAccumulator(str(tmp_path / "results" / TASK / evaluate.EVAL_TRACKER_DIR))
    events.Reload()
    assert set(again["results"]) == {"zero-shot", f"icl-{SHOTS}shot", run_dir.name}
    for name in again["results"]:  # each logged value is the result file's
        saved = load_json(Path(again["files"][name]))
        (score,) = events.Scalars(f"eval/{name}/{saved['metric']}")
        assert score.step == 0 and score.value == pytest.approx(saved["score"], rel=1e-6)
        (ms,) = events.Scalars(f"eval/{name}/ms_per_query")
        assert ms.value == pytest.approx(saved["mean_latency_ms"], rel=1e-6)
    student = load_json(Path(again["files"][run_dir.name]))
    (l2,) = events.Scalars(f"eval/{run_dir.name}/l2_student")
    assert l2.value == pytest.approx(student["l2"]["mean"]["student"], rel=1e-6)


def test_report_to_a_missing_tracker_package_is_refused_before_the_model(trained, monkeypatch):
    import builtins

    root, run_dir, _ = trained
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UserError, match="pip install wandb"):
        evaluate.run(eval_config(root, report_to="wandb"), loaded=None, show_progress=False)


def test_compiled_decoding_gives_the_same_results(evaluated, tmp_path):
    """evaluate --compile on (a static cache and a compiled decode step, pipeline.decoding): every mode's
    generations equal the eager run's; the result says how it decoded; auto stays eager on the CPU."""
    root, run_dir, _, out = evaluated
    loaded = fresh_loaded()
    compiled = evaluate.run(eval_config(root, runs=(str(run_dir),), results_dir=str(tmp_path / "c"), compile="on",
                                        l2=False), loaded=loaded, show_progress=False)
    assert loaded.decoding is not None and loaded.decoding.enabled and loaded.decoding.steps["compiled"] > 0
    for name, result in compiled["results"].items():
        want = out["results"][name]
        assert [r["generation"] for r in result["records"]] == [r["generation"] for r in want["records"]], name
        assert result["score"] == want["score"]
        assert result["generation"]["decoding"] == "compiled" and want["generation"]["decoding"] == "eager"
    auto = fresh_loaded()
    evaluate.run(eval_config(root, modes=("zero-shot",), results_dir=str(tmp_path / "a"), l2=False), loaded=auto,
                 show_progress=False)
    assert auto.decoding is None  # --compile auto: CUDA only
