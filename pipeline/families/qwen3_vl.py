"""Qwen3-VL: Qwen3 decoder (q/k RMS norms, GQA), ViT with 16 px patches merged 2x2, interleaved 3-D rope.

The image layout is Qwen2-VL's (``pipeline/families/qwen2_vl.py``): a prompt writes
``<|vision_start|><|image_pad|><|vision_end|>``, the processor repeats ``<|image_pad|>`` once per merged
patch (one per 32x32 px), ``pixel_values`` are flat patches with ``image_grid_thw``, and the model derives
its 3-D rope positions from input_ids, the attention mask, ``image_grid_thw`` and ``mm_token_type_ids``
(required by Qwen3-VL whenever images are passed), so collate passes no ``position_ids``. The vision
tower's "deepstack" features are added to the first decoder layers' hidden states, before attention,
so the attention modules see ordinary (post-norm, post-rope) queries and keys.
Qwen tokenizers have no BOS: the config's ``bos_token_id`` is ``<|endoftext|>``.
"""

from __future__ import annotations

from .base import Family
from .qwen2_vl import IMAGE_PAD, collate_images, encode_image

QWEN3_VL = Family(
    name="Qwen3-VL",
    model_types=("qwen3_vl",),
    image_token=IMAGE_PAD,
    image_prompt=f"<|vision_start|>{IMAGE_PAD}<|vision_end|>",
    round_separator="\n",
    stop_strings=("\n", "<|im_end|>", "Question:", "Caption:"),
    explicit_position_ids=False,
    start_tokens=("<|endoftext|>",),
    required_tokens=("<|vision_start|>", IMAGE_PAD, "<|vision_end|>"),
    encode_image=encode_image,
    collate_images=collate_images,
)
