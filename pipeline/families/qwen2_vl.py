"""Qwen2-VL and Qwen2.5-VL: ViT patches merged 2x2, multimodal rope computed by the model.

A prompt writes ``<|vision_start|><|image_pad|><|vision_end|>``; the processor repeats
``<|image_pad|>`` once per merged patch. ``pixel_values`` are flat patches (sum of patches, C*T*P*P)
with ``image_grid_thw`` (N_img, 3). The model derives its 3-D rope positions from input_ids, the
attention mask, ``image_grid_thw`` and ``mm_token_type_ids`` (1 on image tokens; transformers >= 5.2x
requires it where the processor returns it), so collate passes no ``position_ids``.
Qwen tokenizers have no BOS: the config's ``bos_token_id`` is ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Encoded, Family, host_cat, process_one

IMAGE_PAD = "<|image_pad|>"


def encode_image(family: Family, processor: Any, text: str, image: Any) -> Encoded:
    """The processor on the image prompt + text with this one image: patches (P, D) and grid (3,)."""
    out = process_one(processor, f"{family.image_placeholder}{text}", image)
    tensors = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"][0]}
    return Encoded(out["input_ids"][0].tolist(), [tensors])


def collate_images(
    family: Family, processor: Any, batch: Sequence[Encoded], text: dict[str, torch.Tensor], pin: bool = False
) -> dict[str, torch.Tensor]:
    """pixel_values (sum P, D), image_grid_thw (N, 3) and, where the processor emits it, mm_token_type_ids."""
    images = [image for enc in batch for image in enc.images]
    out = {
        "pixel_values": host_cat([image["pixel_values"] for image in images], pin),
        "image_grid_thw": torch.stack([image["image_grid_thw"] for image in images]),
    }
    if getattr(processor, "return_mm_token_type_ids", False):
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        is_image = (text["input_ids"] == image_id) & text["attention_mask"].bool()
        out["mm_token_type_ids"] = is_image.to(torch.int)
    return out


QWEN2_VL = Family(
    name="Qwen2-VL",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    image_token=IMAGE_PAD,
    image_prompt=f"<|vision_start|>{IMAGE_PAD}<|vision_end|>",
    round_separator="\n",
    explicit_position_ids=False,
    start_tokens=("<|endoftext|>",),
    required_tokens=("<|vision_start|>", IMAGE_PAD, "<|vision_end|>"),
    encode_image=encode_image,
    collate_images=collate_images,
)
