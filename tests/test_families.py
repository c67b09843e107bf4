"""Families: encode matches the processor, collate's masks/positions/images are padding-invariant,
family lookup, decoder layers and attention geometry. Tiny random models, offline, CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny
from tiny_models import FAMILIES, GEMMA3_SLIDING_WINDOW, build_tokenizer

from pipeline.families import (
    FAMILIES as ALL_FAMILIES,
)
from pipeline.families import (
    Encoded,
    Segment,
    attention_geometry,
    decoder_layers,
    family_for,
)
from pipeline.families.idefics import image_attention_indices

TEXTS = ["Question: what colour is the circle? Short answer: red\n", "Question: how many? Short answer:"]
SIZES = [(56, 56), (84, 56), (56, 84)]


def _encodings(tf, synthetic_image, with_images: bool) -> list[Encoded]:
    """Two samples of different lengths: 2 images + 2 texts, and 1 image + 1 text."""
    fam, proc = tf.family, tf.processor
    vis = with_images and fam.image_token is not None

    def seg(i: int, text: str) -> Segment:
        return Segment(text, synthetic_image(i, SIZES[i % 3]) if vis else None)

    a = fam.bos(proc) + fam.encode(proc, seg(0, TEXTS[0])) + fam.encode(proc, seg(1, TEXTS[1]))
    b = fam.bos(proc) + fam.encode(proc, seg(2, "Caption: a green star."))
    assert len(a) != len(b)
    return [a, b]


def _logits(tf, batch: list[Encoded], side: str = "right", multiple: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return tf.model(**tf.family.collate(batch, tf.processor, side, pad_to_multiple_of=multiple)).logits


def _real(logits: torch.Tensor, row: int, length: int, side: str) -> torch.Tensor:
    return logits[row, -length:] if side == "left" else logits[row, :length]


@pytest.mark.parametrize("multiple", [1, 8], ids=["tight", "multiple-of-8"])
@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text"])
def test_padding_invariance(tiny_family, synthetic_image, with_images, multiple):
    """A sample's logits at its real tokens are the same alone, padded left and padded right, also with the
    batch padded further to a multiple of 8 tokens (the teacher's batches)."""
    tf = tiny_family
    if with_images and tf.family.image_token is None:
        pytest.skip("text-only family")
    encs = _encodings(tf, synthetic_image, with_images)
    alone = [_logits(tf, [e])[0] for e in encs]
    longest = max(len(e) for e in encs)
    for side in ("left", "right"):
        batch = tf.family.collate(encs, tf.processor, side, pad_to_multiple_of=multiple)
        image_keys = set(batch) - {"input_ids", "attention_mask", "position_ids"}
        assert bool(image_keys) == (with_images or tf.family.images_always), sorted(batch)
        width = batch["input_ids"].shape[1]
        assert width == (longest if multiple == 1 else -(-longest // 8) * 8) and width >= longest
        assert batch["attention_mask"].sum(-1).tolist() == [len(e) for e in encs]
        logits = _logits(tf, encs, side, multiple)
        for row, (enc, ref) in enumerate(zip(encs, alone, strict=True)):
            torch.testing.assert_close(_real(logits, row, len(enc), side), ref, atol=1e-5, rtol=0)


def test_images_change_logits(tiny_family, synthetic_image):
    """The invariance test has power: another image in the same place moves the logits (> 1e-3)."""
    tf = tiny_family
    if tf.family.image_token is None:
        pytest.skip("text-only family")
    fam, proc = tf.family, tf.processor
    first = fam.bos(proc) + fam.encode(proc, Segment(TEXTS[1], synthetic_image(0)))
    second = fam.bos(proc) + fam.encode(proc, Segment(TEXTS[1], synthetic_image(5)))
    assert first.input_ids == second.input_ids
    delta = (_logits(tf, [first])[0, -1] - _logits(tf, [second])[0, -1]).abs().max()
    assert delta > 1e-3


def test_position_ids_and_masks(tiny_family):
    tf = tiny_family
    encs = [Encoded([1, 2, 3, 4]), Encoded([5, 6])]
    left = tf.family.collate(encs, tf.processor, "left")
    right = tf.family.collate(encs, tf.processor, "right")
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert left["input_ids"][1, 2:].tolist() == [5, 6] and right["input_ids"][1, :2].tolist() == [5, 6]
    if tf.family.explicit_position_ids:
        assert left["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
        assert right["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    else:
        assert "position_ids" not in left
    with pytest.raises(ValueError, match="padding_side"):
        tf.family.collate(encs, tf.processor, "middle")
    wide = tf.family.collate(encs, tf.processor, "right", pad_to_multiple_of=3)
    assert wide["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert wide["input_ids"][:, :4].tolist() == right["input_ids"].tolist()
    if tf.family.explicit_position_ids:
        assert wide["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3], [0, 1, 1, 1, 1, 1]]
    assert tf.family.collate(encs, tf.processor, "left", pad_to_multiple_of=4)["input_ids"].shape == (2, 4)
    for bad in (0, -8, 2.0, "8"):
        with pytest.raises(ValueError, match="pad_to_multiple_of"):
            tf.family.collate(encs, tf.processor, "right", pad_to_multiple_of=bad)


def _whole_prompt(tf, texts, images):
    """The processor on the whole prompt at once (the reference for image token counts)."""
    proc, fam = tf.processor, tf.family
    if tf.name == "idefics":
        items = [x for pair in zip(images, texts, strict=True) for x in pair]
        return proc(text=[items], add_end_of_utterance_token=False, return_tensors="pt")
    text = "".join(fam.image_placeholder + t for t in texts)
    return proc(text=[text], images=images, add_special_tokens=False, return_tensors="pt")


def test_image_tokens_match_processor(tiny_family, synthetic_image):
    """Segment-wise encoding expands each image exactly as the processor does for the whole prompt."""
    tf = tiny_family
    fam, proc = tf.family, tf.processor
    if fam.image_token is None:
        pytest.skip("text-only family")
    # OneVision's processor gives images of a multi-image prompt fewer tokens; we encode every image as
    # a single image (see pipeline/families/llava.py), so compare on a one-image prompt there.
    n = 1 if tf.name == "llava_onevision" else 2
    images = [synthetic_image(i, SIZES[i]) for i in range(n)]
    ours = Encoded([])
    for text, image in zip(TEXTS[:n], images, strict=True):
        ours = ours + fam.encode(proc, Segment(text, image))
    ref = _whole_prompt(tf, TEXTS[:n], images)["input_ids"][0].tolist()
    if tf.name == "idefics":
        ref = ref[1:]  # the Idefics1 processor writes BOS itself
    image_id = proc.tokenizer.convert_tokens_to_ids(fam.image_token)
    assert ours.input_ids.count(image_id) == ref.count(image_id) > 0
    assert ours.input_ids == ref  # with this tokenizer the segment boundaries do not change any token
    assert len(ours.images) == n


def test_idefics_image_attention_mask_matches_processor(synthetic_image):
    tf = tiny("idefics")
    images = [synthetic_image(0), synthetic_image(1)]
    ref = _whole_prompt(tf, TEXTS, images)
    enc = tf.family.bos(tf.processor)
    for text, image in zip(TEXTS, images, strict=True):
        enc = enc + tf.family.encode(tf.processor, Segment(text, image))
    batch = tf.family.collate([enc], tf.processor)
    assert batch["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(batch["image_attention_mask"], ref["image_attention_mask"].long())
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"])


def test_idefics_image_attention_indices_rule():
    # ids: 5 = <image>, 2 = EOS. Text before any image attends none; after EOS none until the next image.
    ids = [1, 9, 5, 9, 9, 2, 9, 5, 9]
    assert image_attention_indices(ids, 5, 2) == [-1, -1, 0, 0, 0, 0, -1, 1, 1]


def test_text_only_family_rejects_images(synthetic_image):
    tf = tiny("llama")
    with pytest.raises(ValueError, match="text-only"):
        tf.family.encode(tf.processor, Segment("x", synthetic_image(0)))


def test_family_for_tiny_model(tiny_family):
    tf = tiny_family
    assert tf.name == tf.model.config.model_type
    assert tf.name in family_for(tf.model.config).model_types
    assert family_for(tf.model) is family_for(tf.model.config)
    tf.family.check_processor(tf.processor)
    tok = tf.processor.tokenizer if hasattr(tf.processor, "tokenizer") else tf.processor
    assert tok.bos_token_id is not None and tok.pad_token_id is not None


def test_family_for_unknown_type_lists_supported():
    unknown = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(ValueError) as err:
        family_for(unknown)
    message = str(err.value)
    assert "'gpt2'" in message
    for fam in ALL_FAMILIES:
        assert fam.name in message
        for model_type in fam.model_types:
            assert model_type in message
    assert {t for f in ALL_FAMILIES for t in f.model_types} >= set(FAMILIES)


def test_decoder_layers_and_geometry(tiny_family):
    tf = tiny_family
    model = tf.model
    layers = decoder_layers(model)
    assert layers is model.get_decoder().layers
    assert decoder_layers(model.model) is layers  # the bare *Model resolves to the same layers
    config = model.config.get_text_config(decoder=True)
    geo = attention_geometry(model)
    attn = layers[0].self_attn
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert geo.num_layers == config.num_hidden_layers == 2
    assert (geo.num_heads, geo.num_kv_heads, geo.hidden_size) == (
        config.num_attention_heads,
        kv_heads,
        config.hidden_size,
    )
    assert attn.q_proj.out_features == geo.num_heads * geo.head_dim
    assert attn.k_proj.out_features == geo.num_kv_heads * geo.head_dim
    # the tiny Gemma 3 has a local (sliding window) layer 0 and a global layer 1; the others no window
    expected = (GEMMA3_SLIDING_WINDOW, (0,)) if tf.name == "gemma3" else (None, ())
    assert (geo.sliding_window, geo.sliding_layers) == expected


def test_geometry_sliding_window():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=16))
    assert attention_geometry(mistral).sliding_window == 16
    assert attention_geometry(mistral).sliding_layers == (0, 1)
    qwen = Qwen2ForCausalLM(Qwen2Config(**small, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert (attention_geometry(qwen).sliding_window, attention_geometry(qwen).sliding_layers) == (8, (1,))
    assert attention_geometry(Qwen2ForCausalLM(Qwen2Config(**small))).sliding_window is None


def test_attn_implementation_routes_language_model(tiny_family):
    tf = tiny_family
    expected = {"text_config": "eager"} if tf.family.lm_is_sub_config else "eager"
    assert tf.family.attn_implementation("eager") == expected
    attn = decoder_layers(tf.model)[0].self_attn
    try:
        tf.model.set_attn_implementation(tf.family.attn_implementation("eager"))
        assert attn.config._attn_implementation == "eager"
    finally:
        tf.model.set_attn_implementation("sdpa")
    assert attn.config._attn_implementation == "sdpa"


def test_bos_and_start_token_fallback():
    tf = tiny("qwen2_vl")
    assert tf.family.bos(tf.processor).input_ids == [tf.processor.tokenizer.bos_token_id]
    no_bos = build_tokenizer(["<|endoftext|>", "<|im_start|>"])
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    qwen_start = tf.family.bos(no_bos).input_ids
    assert qwen_start == [no_bos.convert_tokens_to_ids("<|endoftext|>")]
    llama_start = tiny("llama").family.bos(no_bos).input_ids
    assert llama_start == [no_bos.convert_tokens_to_ids("<|im_start|>")]  # SmolLM2's start token
    bare = build_tokenizer()
    bare.bos_token = None
    with pytest.raises(ValueError, match="no bos_token"):
        tf.family.bos(bare)


def test_round_separator_tokens():
    """Idefics2/3 end rounds with the real <end_of_utterance> token, one id (not the official typo)."""
    for name in ("idefics2", "idefics3"):
        tf = tiny(name)
        tf.family.check_processor(tf.processor)
        tok = tf.processor.tokenizer
        ids = tf.family.encode(tf.processor, Segment(tf.family.round_separator)).input_ids
        assert ids == [tok.convert_tokens_to_ids("<end_of_utterance>")] + tok("\n", add_special_tokens=False)[
            "input_ids"
        ]
        assert len(tok("<end_of_outterance>", add_special_tokens=False)["input_ids"]) > 1
    fam = tiny("idefics2").family
    with pytest.raises(ValueError, match="end_of_utterance"):
        fam.check_processor(build_tokenizer(["<image>", "<fake_token_around_image>"]))
    assert dataclasses.replace(fam, required_tokens=()).check_processor(build_tokenizer()) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_collate_is_the_same_batch(tiny_family, synthetic_image):
    """collate(pin=True) (teacher-cache on CUDA) builds the images in page-locked memory: same tensors."""
    tf = tiny_family
    if tf.family.image_token is None:
        pytest.skip("text-only family")
    encs = _encodings(tf, synthetic_image, True)
    plain = tf.family.collate(encs, tf.processor, "right")
    pinned = tf.family.collate(encs, tf.processor, "right", pin=True)
    assert plain.keys() == pinned.keys()
    for key, value in plain.items():
        assert torch.equal(pinned[key], value) and pinned[key].dtype == value.dtype, key
    assert pinned["pixel_values"].is_pinned() and not plain["pixel_values"].is_pinned()
