"""Demonstration encodings reused across prompts (``DemoCache``) and page-locked teacher batches.

A prompt built through the cache must equal the one built without it, token for token and tensor for
tensor, and share no memory with the cache or with other prompts.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import tiny

from pipeline.config import UserError
from pipeline.families.base import Family
from pipeline.forward import TeacherRunner, pin_batch, to_device
from pipeline.prompts import DemoCache, Prompt, build_prompt, copy_encoded, encoded_bytes
from pipeline.runtime import wrap_model
from pipeline.tasks import load_task
from pipeline.tasks.base import Example, TaskSpec
from stages.teacher_cache import ShardData, plan_queries, teacher_prompts

SPEC = TaskSpec("vqa", "vqa", "vqa_accuracy", prompt="Question:{question} Short answer:")
SIZES = [(56, 56), (84, 56), (56, 84)]
# each query's demonstrations (indices into the support examples): 8 rounds of 3 distinct ones
DRAWS = [[0, 1], [1, 2], [2, 0], [1, 0]]


def _teacher_collate(family, encodings, processor):
    """A teacher batch as stage 1 collates it: right padding, to a multiple of 8 tokens when the lengths differ."""
    multiple = 8 if len({len(e) for e in encodings}) > 1 else 1
    return family.collate(encodings, processor, "right", pad_to_multiple_of=multiple)


def _support(synthetic_image) -> list[Example]:
    return [Example(f"s{i}", f"what is shape {i}?", (f"a{i}",), synthetic_image(i, SIZES[i])) for i in range(3)]


def _queries(synthetic_image) -> list[Example]:
    return [Example(f"q{i}", f"how many {i}?", (str(i),), synthetic_image(10 + i)) for i in range(len(DRAWS))]


def _prompts(tf, support, queries, answer: bool, cache: DemoCache | None) -> list[Prompt]:
    out = []
    for query, draw in zip(queries, DRAWS, strict=True):
        demos = [support[j] for j in draw]
        out.append(build_prompt(tf.family, tf.processor, SPEC, query, demos, [d.answers[0] for d in demos],
                                query.answers[0] if answer else None, cache))
    return out


def _snapshot(prompt: Prompt) -> tuple:
    """A deep copy of everything a prompt holds."""
    return list(prompt.input_ids), prompt.span_start, prompt.answer_start, copy_encoded(prompt.encoded).images


def _assert_same(prompt: Prompt, reference: Prompt | tuple) -> None:
    ids, span, answer, images = reference if isinstance(reference, tuple) else _snapshot(reference)
    assert prompt.input_ids == ids
    assert (prompt.span_start, prompt.answer_start) == (span, answer)
    assert len(prompt.encoded.images) == len(images)
    for got, want in zip(prompt.encoded.images, images, strict=True):
        if want is None:  # an image left out (pipeline.forward.without_images)
            assert got is None
            continue
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _keep(item):
    return item


def _storages(prompt: Prompt) -> set[int]:
    return {v.untyped_storage().data_ptr() for image in prompt.encoded.images for v in image.values()}


@pytest.mark.parametrize("name", ["idefics", "idefics2", "llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("answer", [True, False], ids=["forced", "generation"])
def test_cached_prompts_equal_uncached(name, answer, synthetic_image):
    tf = tiny(name)
    support, queries = _support(synthetic_image), _queries(synthetic_image)
    plain = _prompts(tf, support, queries, answer, None)
    cache = DemoCache()
    cached = _prompts(tf, support, queries, answer, cache)
    rounds = sum(len(d) for d in DRAWS)
    assert (cache.misses, cache.hits, len(cache)) == (3, rounds - 3, 3)
    for got, want in zip(cached, plain, strict=True):
        _assert_same(got, want)
    # the model inputs too (Idefics1's image_attention_mask, padded crops, tiles)
    got, want = (tf.family.collate([p.encoded for p in ps], tf.processor, "right") for ps in (cached, plain))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["idefics", "idefics2", "llava"])
def test_a_later_prompt_never_changes_an_earlier_one(name, synthetic_image):
    tf = tiny(name)
    support, queries = _support(synthetic_image), _queries(synthetic_image)
    cache = DemoCache()
    first = build_prompt(tf.family, tf.processor, SPEC, queries[0], support[:2], ["a0", "a1"], "0", cache)
    before = _snapshot(first)
    second = build_prompt(tf.family, tf.processor, SPEC, queries[1], support[:2], ["a0", "a1"], "1", cache)
    assert cache.hits == 2
    _assert_same(first, before)
    assert not _storages(first) & _storages(second)  # no tensor is shared between prompts
    # editing a prompt in place (ids, dicts, tensors) reaches neither the earlier prompt nor the cache
    second.encoded.input_ids.append(-1)
    for image in second.encoded.images:
        for value in image.values():
            value.fill_(False) if value.dtype == torch.bool else value.add_(1)
        image["extra"] = torch.zeros(1)
    _assert_same(first, before)
    third = build_prompt(tf.family, tf.processor, SPEC, queries[0], support[:2], ["a0", "a1"], "0", cache)
    assert cache.hits == 4
    _assert_same(third, before)


def test_keys_bounds_and_owner(synthetic_image):
    tf = tiny("llava")
    support = _support(synthetic_image)
    text = "Question:x Short answer: a\n"
    one = DemoCache()
    one.encode(tf.family, tf.processor, support[0], text)
    size = one.bytes
    assert size == encoded_bytes(one.entries[next(iter(one.entries))][0]) > 0
    one.encode(tf.family, tf.processor, support[0], text + "b")  # another answer: another round
    assert (one.misses, one.hits) == (2, 0)

    lru = DemoCache(max_entries=2)
    for i in (0, 1, 0, 2):  # s1 is the least recently used when s2 arrives
        lru.encode(tf.family, tf.processor, support[i], text)
    assert [k[0] for k in lru.entries] == ["s0", "s2"] and (lru.misses, lru.hits) == (3, 1)
    lru.encode(tf.family, tf.processor, support[1], text)
    assert lru.misses == 4 and [k[0] for k in lru.entries] == ["s2", "s1"]

    by_bytes = DemoCache(max_bytes=2 * size)
    for i in range(3):
        by_bytes.encode(tf.family, tf.processor, support[i], text)
    assert len(by_bytes) == 2 and by_bytes.bytes == sum(s for _, s in by_bytes.entries.values()) <= 2 * size
    too_small = DemoCache(max_bytes=size - 1)
    too_small.encode(tf.family, tf.processor, support[0], text)
    assert len(too_small) == 0 and too_small.bytes == 0

    other = tiny("idefics2")  # another family and processor: the cache starts over
    one.encode(other.family, other.processor, support[0], text)
    assert len(one) == 1 and one.misses == 3
    restored = pickle.loads(pickle.dumps(one))
    assert len(restored) == 0 and restored.max_bytes == one.max_bytes and restored.hits == 0
    with pytest.raises(ValueError, match="max_bytes=-1"):
        DemoCache(max_bytes=-1)


def test_image_path_is_part_of_the_key(tmp_path, synthetic_image):
    tf = tiny("llava")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        synthetic_image(i).save(paths[-1])
    cache = DemoCache()
    a = cache.encode(tf.family, tf.processor, Example("s", "q", ("a",), str(paths[0])), "t")
    b = cache.encode(tf.family, tf.processor, Example("s", "q", ("a",), str(paths[1])), "t")
    assert cache.misses == 2 and not torch.equal(a.images[0]["pixel_values"], b.images[0]["pixel_values"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stage1_teacher_prompts_with_the_cache(num_workers):
    """The stage's own builders (cache, answer offset from the plan) give the prompts ``build_prompt``
    gives alone; repeated demonstrations hit (also in DataLoader workers, each with its own cache)."""
    fam = tiny("idefics2")
    loaded = wrap_model(fam.model, fam.processor, "tiny-idefics2")
    task = load_task("shapes_vqa")
    plan = plan_queries(task, loaded, shots=2, n_queries=6, seed=0)
    for p, draw in zip(plan, DRAWS + DRAWS, strict=False):
        p.demo_indices = list(draw)
    queries, support = task.split("train"), task.split("support")
    plain = []
    for p in plan:
        query, demos = queries[p.query_index], [support[j] for j in p.demo_indices]
        plain.append(build_prompt(fam.family, fam.processor, task.spec, query, demos,
                                  [task.demo_answer(d) for d in demos], task.demo_answer(query)))
    if num_workers == 0:
        cache = DemoCache()
        cached = teacher_prompts(task, loaded, plan, None, cache)
        assert (cache.misses, cache.hits) == (3, 2 * len(plan) - 3)
    else:
        rows = [[0, 1, 2], [3, 4, 5]]
        data = ShardData(task, loaded, plan, rows, None, batch_size=2)
        loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_keep, num_workers=num_workers)
        for shard_rows, (items, prompts, (_, batches)) in zip(rows, loader, strict=True):
            assert items == [plan[i] for i in shard_rows]
            for chunk, batch in batches:  # the pixels travel in the collated batches ...
                want = _teacher_collate(fam.family, [plain[shard_rows[j]].encoded for j in chunk], fam.processor)
                assert batch.keys() == want.keys() and all(torch.equal(batch[k], want[k]) for k in want)
            for got, want in zip(prompts, [plain[i] for i in shard_rows], strict=True):  # ... not in the prompts
                _assert_same(got, (want.input_ids, want.span_start, want.answer_start, [None] * 3))
        assert len(data.demo_cache) == 0  # filled in the workers only
        return
    for got, want in zip(cached, plain, strict=True):
        _assert_same(got, want)


@pytest.mark.parametrize("name", ["idefics2", "llava"])
def test_a_known_answer_offset_spares_one_query_encoding(name, synthetic_image, monkeypatch):
    tf = tiny(name)
    support, queries = _support(synthetic_image), _queries(synthetic_image)
    student = build_prompt(tf.family, tf.processor, SPEC, queries[0], [], [], "0")
    calls = []
    encode = Family.encode
    monkeypatch.setattr(Family, "encode", lambda self, *a: calls.append(a[1].text) or encode(self, *a))
    reference = build_prompt(tf.family, tf.processor, SPEC, queries[0], support[:2], ["a0", "a1"], "0")
    assert len(calls) == 4
    offset = student.answer_start - student.span_start
    known = build_prompt(tf.family, tf.processor, SPEC, queries[0], support[:2], ["a0", "a1"], "0",
                         answer_offset=offset)
    assert len(calls) == 4 + 3  # two rounds and the query with its answer; not the query alone
    _assert_same(known, reference)
    with pytest.raises(ValueError, match="answer_offset 0 is outside"):
        build_prompt(tf.family, tf.processor, SPEC, queries[0], [], [], "0", answer_offset=0)


def test_pinning_is_a_no_op_on_cpu_and_pins_when_asked():
    fam = tiny("idefics2")
    loaded = wrap_model(fam.model, fam.processor, "tiny-idefics2")
    runner = TeacherRunner(loaded, "mlp", batch_size=2)
    assert runner.pin is False
    task = load_task("shapes_vqa")
    plan = plan_queries(task, loaded, shots=1, n_queries=3, seed=0)
    prompts = teacher_prompts(task, loaded, plan, None)
    size, chunks = runner.collate_sorted(prompts)
    assert size == 2 and [len(c) for c, _ in chunks] == [2, 1]
    assert [j for c, _ in chunks for j in c] == sorted(range(3), key=lambda i: len(prompts[i].encoded))
    for chunk, batch in chunks:
        want = _teacher_collate(loaded.family, [prompts[j].encoded for j in chunk], loaded.processor)
        assert all(torch.equal(batch[k], want[k]) for k in want)
        assert pin_batch(batch, False) is batch
        moved = to_device(batch, torch.device("cpu"), torch.bfloat16)
        assert moved["pixel_values"].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.long
        assert torch.equal(moved["pixel_values"], batch["pixel_values"].to(torch.bfloat16))
        assert moved["input_ids"] is batch["input_ids"]  # nothing copied for the CPU

    batch = {**chunks[0][1], "note": "kept"}
    try:
        pinned = pin_batch(batch, True)
    except RuntimeError as err:  # no accelerator to page-lock memory for
        pytest.skip(f"page-locked memory is unavailable here: {err}")
    assert pinned["note"] == "kept"
    for key, value in batch.items():
        if torch.is_tensor(value):
            assert pinned[key].is_pinned() and torch.equal(pinned[key], value) and pinned[key].dtype == value.dtype


def test_images_cast_in_the_workers_give_the_batch_the_device_gets(monkeypatch):
    """ShardData casts pixels to the model's 16-bit dtype on the host: after collation and the move
    to the device, bit for bit what the float32 prompts give (to_device's cast), so the store is unchanged."""
    from pipeline.forward import cast_images

    fam = tiny("idefics2")
    loaded = wrap_model(fam.model, fam.processor, "tiny-idefics2")
    task = load_task("shapes_vqa")
    plan = plan_queries(task, loaded, shots=2, n_queries=3, seed=0)
    prompts = teacher_prompts(task, loaded, plan, None)
    assert prompts[0].encoded.images[0]["pixel_values"].dtype == torch.float32
    assert cast_images(prompts[0], torch.float32) is prompts[0]  # a float32 model: nothing to do
    cast = [cast_images(p, torch.bfloat16) for p in prompts]
    assert cast[0].encoded.images[0]["pixel_values"].dtype == torch.bfloat16
    assert prompts[0].encoded.images[0]["pixel_values"].dtype == torch.float32  # the original is untouched
    want = to_device(loaded.family.collate([p.encoded for p in prompts], fam.processor), torch.device("cpu"),
                     torch.bfloat16)
    got = to_device(loaded.family.collate([p.encoded for p in cast], fam.processor), torch.device("cpu"),
                    torch.bfloat16)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype, key
    # the data the workers hand over: a bf16 model's ShardData casts (the shared tiny model is not
    # converted: a round trip through bf16 would change it for later tests)
    import stages.teacher_cache as tc

    monkeypatch.setattr(tc, "model_dtype", lambda model: torch.bfloat16)
    items, sent, (size, batches) = ShardData(task, loaded, plan, [[0, 1, 2]], None, batch_size=2)[0]
    assert items == plan[:3]
    assert [p.input_ids for p in sent] == [p.input_ids for p in prompts]
    assert all(image is None for p in sent for image in p.encoded.images)  # the pixels are in the batches only
    # its batches are launch_sorted's: sorted by length, 2 a batch, the same tensors as collating the cast prompts
    order = sorted(range(3), key=lambda i: len(prompts[i].encoded))
    assert size == 2 and [c for c, _ in batches] == [order[:2], order[2:]]
    for chunk, got in batches:
        assert got["pixel_values"].dtype == torch.bfloat16 and got["pixel_attention_mask"].dtype == torch.bool
        want = _teacher_collate(loaded.family, [cast[j].encoded for j in chunk], fam.processor)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a prompt over the limit comes back as a UserError value (re-raised by shard_prompts as one line)
    err = ShardData(task, loaded, plan, [[0]], 3, batch_size=2)[0]
    assert isinstance(err, UserError) and "more than the limit 3" in str(err)
