"""Demonstrations by similarity (``--demos similar``): nearest-k against a brute-force cosine search, the
embedding cache (reused, invalidated), self-exclusion, and the stages that choose demonstrations."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny

from pipeline.config import UserError, load_config
from pipeline.prompts import build_prompt
from pipeline.retrieval import IMAGE_METHOD, TEXT_METHOD, build_index, cache_path, content_stamp, index_key
from pipeline.runtime import wrap_model
from pipeline.settings import TrainConfig
from pipeline.store import open_store
from pipeline.tasks import load_task
from pipeline.tasks.base import Example
from pipeline.tasks.sampling import sample_demonstrations
from stages import evaluate, teacher_cache
from stages.training import StudentData, demo_choice


def pool(n: int) -> list[Example]:
    return [Example(id=f"s{i}", question=f"question {i}", answers=(f"a{i}",)) for i in range(n)]


def vectors(ids: list[str], d: int = 6, seed: int = 0) -> dict[str, list[float]]:
    rng = random.Random(seed)
    return {i: [rng.gauss(0, 1) for _ in range(d)] for i in ids}


class Embedder:
    """Embeddings looked up by example id; counts the examples it was asked to embed."""

    def __init__(self, table: dict[str, list[float]]):
        self.table, self.calls = table, 0

    def __call__(self, examples):
        self.calls += len(examples)
        return torch.tensor([self.table[e.id] for e in examples])


def brute_force(table: dict[str, list[float]], support_ids: list[str], query_id: str, k: int) -> list[int]:
    """The k nearest support rows by cosine, written out in plain Python: descending similarity, ties to the
    lower index, the query's own id skipped, then the most similar last."""
    q = table[query_id]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / (math.sqrt(sum(x * x for x in a))
                                                                  * math.sqrt(sum(y * y for y in b)))

    scored = [(-cos(table[s], q), j) for j, s in enumerate(support_ids) if s != query_id]
    return [j for _, j in sorted(scored)[:k]][::-1]


def index_of(support, table, tmp_path, fingerprint="model-a", embed=None):
    return build_index(support, fingerprint=fingerprint, task="toy", method=TEXT_METHOD,
                       embed=embed or Embedder(table), cache_dir=tmp_path)


def test_similar_picks_the_brute_force_neighbours_in_order(tmp_path):
    support = pool(40)
    outside = [Example(id=f"q{i}", question="?", answers=("x",)) for i in range(10)]
    table = vectors([e.id for e in support + outside])
    index = index_of(support, table, tmp_path)
    ids = [e.id for e in support]
    for query in outside + support[:10]:
        for k in (1, 4, 9):
            got = sample_demonstrations(support, query, k, seed=5, strategy="similar", index=index)
            assert got == brute_force(table, ids, query.id, k), (query.id, k)
    # the seed plays no part in the similar strategy
    assert (sample_demonstrations(support, outside[0], 5, 1, "similar", index)
            == sample_demonstrations(support, outside[0], 5, 2, "similar", index))


def test_query_is_never_its_own_demonstration(tmp_path):
    support = pool(12)
    table = vectors([e.id for e in support])
    index = index_of(support, table, tmp_path)
    for j, query in enumerate(support):
        picked = sample_demonstrations(support, query, 11, 0, "similar", index)
        assert j not in picked and sorted(picked) == [i for i in range(12) if i != j]
        # its own row is the most similar there is (cosine 1), yet the nearest kept is another
        assert picked[-1] == brute_force(table, [e.id for e in support], query.id, 1)[0] != j
    with pytest.raises(UserError, match="only 11 other examples"):
        sample_demonstrations(support, support[0], 12, 0, "similar", index)
    outside = Example(id="elsewhere", question="?", answers=("x",))
    table["elsewhere"] = [1.0] * 6
    assert sorted(sample_demonstrations(support, outside, 12, 0, "similar", index)) == list(range(12))


def test_cache_is_reused_and_invalidated(tmp_path):
    support = pool(37)
    table = vectors([e.id for e in support] + ["extra"])
    first = Embedder(table)
    a = index_of(support, table, tmp_path, embed=first)
    assert first.calls == 37
    again = Embedder(table)
    b = index_of(support, table, tmp_path, embed=again)
    assert again.calls == 0 and torch.equal(a.embeddings, b.embeddings)
    # another support set: computed again (and the earlier file is still the earlier set's)
    changed = support[:-1] + [Example(id="extra", question="?", answers=("x",))]
    other = Embedder(table)
    c = index_of(changed, table, tmp_path, embed=other)
    assert other.calls == 37 and c.support_ids[-1] == "extra"
    # another model: computed again
    model_b = Embedder(table)
    index_of(support, table, tmp_path, fingerprint="model-b", embed=model_b)
    assert model_b.calls == 37
    # a damaged cache file is not trusted: computed again
    key = index_key("model-a", "toy", [e.id for e in support], TEXT_METHOD, content_stamp(support))
    path = cache_path("toy", TEXT_METHOD, key, tmp_path)
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:40])
    damaged = Embedder(table)
    d = index_of(support, table, tmp_path, embed=damaged)
    assert damaged.calls == 37 and torch.equal(d.embeddings, a.embeddings)


def test_cache_is_invalidated_by_changed_rows_under_the_same_ids(tmp_path):
    """A user task numbers its rows (``data-0``, ``data-1``, ...): an edited data file keeps the ids, and
    embeddings of the old rows must not be reused for it."""
    import datasets

    from pipeline.tasks.official import ExampleView

    def view(questions):
        table = datasets.Dataset.from_dict({"id": [f"data-{i}" for i in range(len(questions))], "q": questions})
        return ExampleView(table, lambda row: Example(id=row["id"], question=row["q"], answers=("x",)), "id")

    def embed(examples):  # an embedding of the text itself: 3 letter counts
        embed.calls += len(examples)
        return torch.tensor([[float(e.question.count(c)) for c in "abc"] for e in examples])

    embed.calls = 0
    first = build_index(view(["aab", "bbc", "cca"]), fingerprint="m", task="toy", method=TEXT_METHOD, embed=embed,
                        cache_dir=tmp_path)
    assert embed.calls == 3
    build_index(view(["aab", "bbc", "cca"]), fingerprint="m", task="toy", method=TEXT_METHOD, embed=embed,
                cache_dir=tmp_path)
    assert embed.calls == 3  # the same rows: read from the cache
    edited = build_index(view(["ccc", "bbc", "cca"]), fingerprint="m", task="toy", method=TEXT_METHOD, embed=embed,
                         cache_dir=tmp_path)
    assert embed.calls == 6 and edited.support_ids == first.support_ids
    assert edited.embeddings[0].tolist() == [0.0, 0.0, 3.0]  # the edited row's, not the cached "aab"
    changed = pool(3)
    changed[1] = Example(id="s1", question="another question", answers=("a1",))
    listed = Embedder({e.id: [1.0, float(i)] for i, e in enumerate(changed)})
    index_of(pool(3), {e.id: [1.0, float(i)] for i, e in enumerate(changed)}, tmp_path)
    index_of(changed, {}, tmp_path, embed=listed)  # a list of examples: by their questions too
    assert listed.calls == 3


def test_store_choice_is_kept_or_refused():
    class Config:
        demos = None

    assert demo_choice(Config(), {"demo_strategy": "similar"}) == "similar"
    assert demo_choice(Config(), {}) == "random"
    Config.demos = "random"
    with pytest.raises(UserError, match="--demos random differs from the store's demonstrations \\(similar\\)"):
        demo_choice(Config(), {"demo_strategy": "similar"})
    Config.demos = "similar"
    assert demo_choice(Config(), {"demo_strategy": "similar"}) == "similar"
    assert demo_choice(Config(), {}) == "similar"


# --- the model's own embeddings, computed independently here -------------------------------------------------


def reference_embeddings(name: str, loaded, task, examples) -> dict[str, list[float]]:
    """One example per forward, no padding, through the model's public outputs (not pipeline.retrieval)."""
    model, processor = loaded.model, loaded.processor
    out = {}
    with torch.no_grad():
        for e in examples:
            if name == "llama":  # mean of the last hidden state over the question's tokens (BOS left out)
                ids = [processor.bos_token_id] + processor(e.question, add_special_tokens=False)["input_ids"]
                hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, 1:]
                out[e.id] = hidden.mean(0).tolist()
            else:  # LLaVA: the projected image features of its vision tower (transformers' get_image_features)
                prompt = build_prompt(loaded.family, processor, task.spec, e, [], [], None)
                pixels = loaded.family.collate([prompt.encoded], processor, "right")["pixel_values"]
                feats = model.get_image_features(
                    pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
                    vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
                out[e.id] = torch.cat(list(feats)).mean(0).tolist()
    return out


@pytest.mark.parametrize("name,task_name,method", [("llama", "antonyms", TEXT_METHOD),
                                                   ("llava", "shapes_vqa", IMAGE_METHOD)])
def test_teacher_cache_records_similar_and_its_demonstrations(tmp_path, monkeypatch, name, task_name, method):
    monkeypatch.setenv("MIMIC_CACHE", str(tmp_path / "cache"))
    tf = tiny(name)
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, f"tiny-{name}")
    options = dict(task=task_name, model=f"tiny-{name}", out=str(tmp_path / "s.zarr"), shots=3, n_queries=4,
                   device="cpu", shard_size=2)
    path = teacher_cache.run(teacher_cache.TeacherCacheConfig(**options, demos="similar"), loaded=loaded,
                             show_progress=False)
    store = open_store(path)
    assert store.attrs["demo_strategy"] == "similar" and store.attrs["demo_embedding"] == method
    assert list((tmp_path / "cache" / "retrieval").glob(f"{task_name}-{method}-*.safetensors"))
    task = load_task(task_name)
    support, queries = task.split("support"), task.split("train")
    support_list = [support[j] for j in range(len(support))]
    asked = [queries[store.read(i).query_id] for i in range(len(store))]
    table = reference_embeddings(name, loaded, task, support_list + asked)
    ids = [e.id for e in support_list]
    for i, query in enumerate(asked):
        record = store.read(i)
        want = brute_force(table, ids, query.id, 3)
        assert [int(j) for j in record.icd_ids] == want, query.id
        assert query.id not in {ids[j] for j in want}
    # the same configuration resumes the store; random demonstrations are another configuration
    teacher_cache.run(teacher_cache.TeacherCacheConfig(**options, demos="similar"), loaded=loaded, show_progress=False)
    with pytest.raises(UserError, match="demo_strategy"):
        teacher_cache.run(teacher_cache.TeacherCacheConfig(**options), loaded=loaded, show_progress=False)


def test_evaluate_icl_with_similar_demonstrations(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMIC_CACHE", str(tmp_path / "cache"))
    tf = tiny("llama")
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-llama")
    config = evaluate.EvalConfig(task="antonyms", model="tiny-llama", shots=2, modes=("icl",), n_queries=4,
                                 batch_size=4, results_dir=str(tmp_path / "results"), device="cpu", demos="similar")
    out = evaluate.run(config, loaded=loaded, show_progress=False)
    result = out["results"]["icl-2shot-similar"]
    saved = json.loads(Path(out["files"]["icl-2shot-similar"]).read_text())
    assert result["demos"] == saved["demos"] == "similar" and saved["config"]["demos"] == "similar"
    task = load_task("antonyms")
    support = [task.split("support")[j] for j in range(len(task.split("support")))]
    queries = [task.split("eval")[j] for j in range(4)]
    table = reference_embeddings("llama", loaded, task, support + queries)
    for record, query in zip(saved["records"], queries, strict=True):
        assert record["demo_ids"] == [support[j].id for j in brute_force(table, [e.id for e in support], query.id, 2)]
    assert "2-shot ICL (similar demos)" in out["table"]


def test_online_teacher_uses_the_store_choice_or_refuses(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMIC_CACHE", str(tmp_path / "cache"))
    tf = tiny("llama")
    loaded = wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-llama")
    path = teacher_cache.run(teacher_cache.TeacherCacheConfig(
        task="antonyms", model="tiny-llama", out=str(tmp_path / "s.zarr"), shots=2, n_queries=4, device="cpu",
        demos="similar"), loaded=loaded, show_progress=False)
    store = open_store(path)
    task = load_task("antonyms")
    online = load_config(TrainConfig, cache=str(path), online=True)
    data = StudentData(online, task, loaded, store.attrs, str(path))
    stored = [[int(j) for j in store.read(i).icd_ids] for i in range(len(store))]
    assert data.demo_strategy == "similar" and data.demos == stored
    assert [data.sample_demos(i, epoch=3) for i in range(len(data))] == stored  # the nearest stay the nearest
    with pytest.raises(UserError, match="--demos random differs from the store's demonstrations"):
        StudentData(load_config(TrainConfig, cache=str(path), online=True, demos="random"), task, loaded,
                    store.attrs, str(path))
    # without a store: --demos similar chooses what teacher-cache chose for the same queries
    alone = StudentData(load_config(TrainConfig, online=True, task="antonyms", shots=2, n_queries=4, demos="similar"),
                        task, loaded, {}, None)
    assert alone.demos == stored
