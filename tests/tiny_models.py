"""Tiny random instances of every supported family, built in-process and offline, for tests.

``build_tiny(name)`` returns ``(model, processor)``: a 2-layer, hidden-32 model (4 heads, 2 KV heads where
the family has GQA) in float32 eval mode, and the family's real processor class built from its
``*ImageProcessorPil`` image processor and a byte-level BPE tokenizer trained in-process on a fixed
corpus, with the family's image tokens and round markers added. Nothing is downloaded.

Vision towers see 28-56 px with 14 px patches, so an image of 56-84 px costs few tokens: Idefics1 1
``<image>`` (+ cross-attention to 4 patches), Idefics2 20 ``<image>`` (4 split crops + the whole image,
4 perceiver latents each), Idefics3/SmolVLM 20 ``<image>`` (2x2 crops + global of 56 px, 4 tokens each
after pixel shuffle; ~34 tokens with the row/column markers), LLaVA 4, LLaVA-NeXT/OneVision 14-24
(anyres: base view + tiles, minus unpadding), Qwen2-VL/2.5-VL 1-4 (at most 56x56 px, 2x2 merge), Qwen3-VL
2-4 (16 px patches, at most 64x64 px), Gemma 3 4 soft tokens (56 px, pooled 2x2; a sliding window of 6 on
layer 0, ``query_pre_attn_scalar`` 12), InternVL 1-3 ``<IMG_CONTEXT>`` (28 px tiles, 1 token each after
pixel shuffle; a non-square image is 2 tiles + a thumbnail).

Models are cached per ``(name, seed)``: callers that change a model (attach heads, set an attention
implementation) must undo it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

FAMILIES = ["idefics", "idefics2", "idefics3", "smolvlm", "llava", "llava_next", "llava_onevision",
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl", "llama"]
"""Names accepted by ``build_tiny``; each is the ``config.model_type`` of the model it builds."""

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
LAYERS = 2

_CORPUS = [
    "Question: what colour is the circle? Short answer: red",
    "Question: how many squares are there? Short answer: 3",
    "Question: is the triangle blue? Short answer: yes",
    "Question: where is the star? Short answer: left",
    "Caption: a red circle and a blue square on a white background.",
    "Caption: two green triangles next to a yellow star.",
    "A photo of a small black dog, a large cat and an orange ball.",
    "Input: hot Output: cold. Input: big Output: small. Input: up Output: down.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100",
    "What Which Who How Why left right top bottom middle shape shapes colour color image picture",
]
_BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

_FAMILY_TOKENS: dict[str, list[str]] = {
    "idefics": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
    "idefics2": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "llava_onevision": ["<image>", "<video>", "<|im_start|>", "<|im_end|>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>",
                 "<|im_end|>", "<|endoftext|>"],
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"],
    "internvl": ["<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "llama": ["<|im_start|>", "<|im_end|>"],
}
_FAMILY_TOKENS["smolvlm"] = _FAMILY_TOKENS["idefics3"] + ["<video>"]
_FAMILY_TOKENS["qwen2_5_vl"] = _FAMILY_TOKENS["qwen3_vl"] = _FAMILY_TOKENS["qwen2_vl"]

_NAMED_TOKENS: dict[str, dict[str, str]] = {
    # processors that read their image tokens from tokenizer attributes (the hub tokenizers' extra_special_tokens)
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
}


def build_tokenizer(extra_tokens: list[str] | tuple[str, ...] = (), named_tokens: dict[str, str] | None = None) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in-process (vocabulary ~300 + extras).

    BOS ``<s>`` is prepended when ``add_special_tokens=True`` (as Llama/Mistral tokenizers do); the pad
    token is ``<pad>`` (id 0). ``extra_tokens`` are added as special tokens. ``named_tokens`` (attribute ->
    one of ``extra_tokens``) become tokenizer attributes ``tok.<name>`` / ``tok.<name>_id``, as the hub
    tokenizers' ``extra_special_tokens`` do (Gemma 3's ``boi_token``, InternVL's ``context_image_token``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=_BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    named = {}
    if named_tokens:
        # the named tokens must exist before the wrapper reads them; the other extras keep their ids
        # (each extra token is appended in order either way)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_tokens])
        named = {"extra_special_tokens": dict(named_tokens)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        **named,
    )
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return fast


@contextlib.contextmanager
def tolerate_missing_video_processor(processor_cls: type) -> Iterator[None]:
    """Let ``processor_cls(..., video_processor=None)`` pass its argument check.

    Without torchvision, ``VideoProcessorMixin`` is a dummy and ``ProcessorMixin`` fails with an
    AttributeError while checking the class of *any* video processor argument, None included. Images never
    touch the video processor, so the check is skipped for None only, for the duration of the block.
    """
    name = "check_argument_for_proper_class"
    own = processor_cls.__dict__.get(name)
    original = getattr(processor_cls, name)

    def check(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name == "video_processor":
            return None
        return original(self, argument_name, argument)

    setattr(processor_cls, name, check)
    try:
        yield
    finally:
        if own is None:
            delattr(processor_cls, name)
        else:
            setattr(processor_cls, name, own)


def _text_config(tokenizer: Any, kv_heads: int = KV_HEADS, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        **extra,
    }


def _tid(tokenizer: Any, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def _idefics(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessorPil,
        IdeficsProcessor,
    )

    config = IdeficsConfig(
        vocab_size=len(tok), additional_vocab_size=0, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        use_resampler=False,
        vision_config={"embed_dim": HIDDEN, "image_size": 28, "patch_size": 14, "num_hidden_layers": 1,
                       "num_attention_heads": HEADS, "intermediate_size": 2 * HIDDEN},
    )
    processor = IdeficsProcessor(IdeficsImageProcessorPil(image_size=28), tok)
    model = IdeficsForVisionText2Text(config)
    # The gates start at zero ("zeros" init; "normal" init fails for scalar gates in transformers 5.24),
    # which would hide the images from the text: open them as a trained model has them.
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(0.0, 1.0)
            layer.alpha_dense.normal_(0.0, 1.0)
    return model, processor


def _idefics2(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessorPil,
        Idefics2Processor,
    )

    config = Idefics2Config(
        text_config={"model_type": "mistral", **_text_config(tok), "sliding_window": None},
        vision_config={"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 1,
                       "num_attention_heads": HEADS, "image_size": 56, "patch_size": 14},
        perceiver_config={"hidden_size": HIDDEN, "resampler_n_latents": 4, "resampler_depth": 1,
                          "resampler_n_heads": 2, "resampler_head_dim": 8, "num_key_value_heads": 1,
                          # at the default 0.02 the latents barely depend on the image (logit change ~3e-4)
                          "initializer_range": 0.2},
        image_token_id=_tid(tok, "<image>"),
    )
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=True, size={"shortest_edge": 28, "longest_edge": 56}
    )
    processor = Idefics2Processor(image_processor, tok, image_seq_len=4)
    return Idefics2ForConditionalGeneration(config), processor


def _idefics3_like(tok: Any, kind: str) -> tuple[Any, Any]:
    import transformers as tf

    names = {
        "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", "Idefics3ImageProcessorPil",
                     "Idefics3Processor"),
        "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", "SmolVLMImageProcessorPil",
                    "SmolVLMProcessor"),
    }[kind]
    config_cls, model_cls, image_cls, processor_cls = (getattr(tf, n) for n in names)
    config = config_cls(
        text_config={"model_type": "llama", **_text_config(tok)},
        vision_config={"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 1,
                       "num_attention_heads": HEADS, "image_size": 56, "patch_size": 14},
        scale_factor=2,
        image_token_id=_tid(tok, "<image>"),
    )
    image_processor = image_cls(
        size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True
    )
    # 56 px crops, 14 px patches, pixel shuffle by 2: (4 * 4) / 2**2 = 4 tokens per crop
    if kind == "smolvlm":
        with tolerate_missing_video_processor(processor_cls):
            processor = processor_cls(image_processor, tok, None, image_seq_len=4)
    else:
        processor = processor_cls(image_processor, tok, image_seq_len=4)
    return model_cls(config), processor


def _clip_vision(image_size: int = 28) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": 2, "num_attention_heads": HEADS, "image_size": image_size, "patch_size": 14,
            "projection_dim": HIDDEN}


def _llava(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    config = LlavaConfig(
        text_config={"model_type": "llama", **_text_config(tok)}, vision_config=_clip_vision(),
        image_token_index=_tid(tok, "<image>"), image_seq_length=4,
    )
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor, tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(config), processor


_PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _llava_next(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    config = LlavaNextConfig(
        text_config={"model_type": "mistral", **_text_config(tok), "sliding_window": None},
        vision_config=_clip_vision(), image_token_index=_tid(tok, "<image>"), image_grid_pinpoints=_PINPOINTS,
        image_seq_length=4,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=_PINPOINTS
    )
    processor = LlavaNextProcessor(image_processor, tok, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    return LlavaNextForConditionalGeneration(config), processor


def _llava_onevision(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    vision = {"model_type": "siglip_vision_model", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
              "num_hidden_layers": 2, "num_attention_heads": HEADS, "image_size": 28, "patch_size": 14}
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text_config(tok)}, vision_config=vision,
        image_token_index=_tid(tok, "<image>"), video_token_index=_tid(tok, "<video>"),
        image_grid_pinpoints=_PINPOINTS,
    )
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=_PINPOINTS)
    with tolerate_missing_video_processor(LlavaOnevisionProcessor):
        processor = LlavaOnevisionProcessor(image_processor, tok, video_processor=None, num_image_tokens=4,
                                            vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(config), processor


def _qwen_vl(tok: Any, kind: str) -> tuple[Any, Any]:
    import transformers as tf

    text = _text_config(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [1, 1, 2]})
    ids = {"image_token_id": _tid(tok, "<|image_pad|>"), "video_token_id": _tid(tok, "<|video_pad|>"),
           "vision_start_token_id": _tid(tok, "<|vision_start|>"), "vision_end_token_id": _tid(tok, "<|vision_end|>")}
    if kind == "qwen2_vl":
        vision = {"depth": 1, "embed_dim": HIDDEN, "hidden_size": HIDDEN, "mlp_ratio": 2, "num_heads": HEADS,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model_cls, processor_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    else:
        vision = {"depth": 2, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_heads": HEADS,
                  "out_hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 56, "fullatt_block_indexes": [1]}
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model_cls, processor_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
    # 28 px = 2x2 patches = 1 token after the 2x2 merge; 56 px square = 4 tokens
    image_processor = tf.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14,
                                                  merge_size=2, temporal_patch_size=2)
    with tolerate_missing_video_processor(processor_cls):
        processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=None)
    return model_cls(config), processor


def _qwen3_vl(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    # head_dim 8: 4 rotary frequencies split over (t, h, w), interleaved as in the released models
    text = _text_config(tok, head_dim=HIDDEN // HEADS, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = {"depth": 2, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_heads": HEADS,
              "out_hidden_size": HIDDEN, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=_tid(tok, "<|image_pad|>"),
        video_token_id=_tid(tok, "<|video_pad|>"), vision_start_token_id=_tid(tok, "<|vision_start|>"),
        vision_end_token_id=_tid(tok, "<|vision_end|>"),
    )
    # 16 px patches merged 2x2: 32 px per token; at most 64x64 px = 4 tokens
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2,
                                               temporal_patch_size=2)
    with tolerate_missing_video_processor(Qwen3VLProcessor):
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None)
    return Qwen3VLForConditionalGeneration(config), processor


GEMMA3_SLIDING_WINDOW = 6
"""The tiny Gemma 3's window: shorter than the test prompts, so layer 0's mask really slides."""


def _gemma3(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    # query_pre_attn_scalar != head_dim: the attention scale is not head_dim ** -0.5 (as in gemma-3-27b)
    text = {"model_type": "gemma3_text", **_text_config(tok), "head_dim": HIDDEN // HEADS,
            "query_pre_attn_scalar": 12, "sliding_window": GEMMA3_SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"]}
    vision = {"model_type": "siglip_vision_model", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
              "num_hidden_layers": 1, "num_attention_heads": HEADS, "image_size": 56, "patch_size": 14}
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=_tid(tok, "<start_of_image>"), eoi_token_index=_tid(tok, "<end_of_image>"),
        image_token_index=_tid(tok, "<image_soft_token>"),
    )
    # 56 px, 14 px patches: 4x4 patches average-pooled to 2x2 = 4 soft tokens per image
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    processor = Gemma3Processor(image_processor, tok, image_seq_length=4)
    model = Gemma3ForConditionalGeneration(config)
    # The projection into the text stream starts at zero (Gemma 3's init), which would hide the images
    # from the text: give it weights of the size a trained one has.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, HIDDEN**-0.5)
    return model, processor


def _internvl(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    vision = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 1,
              "num_attention_heads": HEADS, "image_size": [28, 28], "patch_size": [14, 14]}
    config = InternVLConfig(
        text_config={"model_type": "qwen2", **_text_config(tok)}, vision_config=vision,
        image_token_id=_tid(tok, "<IMG_CONTEXT>"), image_seq_length=1, downsample_ratio=0.5,
    )
    # 28 px tiles, 14 px patches: 2x2 patches, pixel shuffle by 0.5 = 1 token per tile; a non-square
    # image is cut into 2 tiles plus a thumbnail
    image_processor = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                               min_patches=1, max_patches=2)
    with tolerate_missing_video_processor(InternVLProcessor):
        processor = InternVLProcessor(image_processor, tok, video_processor=None, image_seq_length=1)
    return InternVLForConditionalGeneration(config), processor


def _llama(tok: Any) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_text_config(tok))), tok


_BUILDERS = {
    "idefics": _idefics,
    "idefics2": _idefics2,
    "idefics3": lambda tok: _idefics3_like(tok, "idefics3"),
    "smolvlm": lambda tok: _idefics3_like(tok, "smolvlm"),
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda tok: _qwen_vl(tok, "qwen2_vl"),
    "qwen2_5_vl": lambda tok: _qwen_vl(tok, "qwen2_5_vl"),
    "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3,
    "internvl": _internvl,
    "llama": _llama,
}


@functools.cache
def build_tiny(name: str, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random ``(model, processor)`` of family ``name`` (one of ``FAMILIES``), float32, eval mode.

    The processor of ``llama`` is its tokenizer. Weights depend only on ``seed`` (the global RNG is left
    as it was). Cached: the same objects are returned for the same arguments.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny family {name!r}; choose one of: {', '.join(FAMILIES)}")
    tokenizer = build_tokenizer(_FAMILY_TOKENS[name], _NAMED_TOKENS.get(name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[name](tokenizer)
    return model.float().eval(), processor


_COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30), (20, 20, 20), (160, 60, 200)]


def synthetic_image(seed: int, size: tuple[int, int] = (56, 56)) -> Any:
    """A PIL RGB image (width, height) = ``size``: 1-3 random filled shapes on a light background."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randint(0, width // 2), rng.randint(0, height // 2)
        box = [x0, y0, x0 + rng.randint(width // 4, width // 2), y0 + rng.randint(height // 4, height // 2)]
        colour = rng.choice(_COLOURS)
        shape = rng.choice(["ellipse", "rectangle", "polygon"])
        if shape == "polygon":
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
        else:
            getattr(draw, shape)(box, fill=colour)
    return image
