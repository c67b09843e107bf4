"""InternVL (2.5 / 3, the ``-hf`` checkpoints): InternViT tower, pixel-shuffle MLP projector, Qwen2/Llama decoder.

A prompt writes ``<IMG_CONTEXT>``; the processor replaces it by ``<img>`` + ``image_seq_length`` x
``<IMG_CONTEXT>`` per tile + ``</img>`` (256 per 448 px tile in the released models). With
``crop_to_patches`` (the processor's default) an image is cut into a grid of tiles chosen by its aspect
ratio plus a thumbnail when there is more than one tile, so the token count depends on the image's size.
``pixel_values`` are the tiles of all images, flat (sum of tiles, C, H, W), in prompt order; the model
scatters their features over the ``<IMG_CONTEXT>`` tokens in order. Positions are ordinary 1-D.
Qwen2 tokenizers have no BOS: the config's ``bos_token_id`` is ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Encoded, Family, host_cat, process_one

IMG_CONTEXT = "<IMG_CONTEXT>"


def encode_image(family: Family, processor: Any, text: str, image: Any) -> Encoded:
    """The processor on ``<IMG_CONTEXT>`` + text with this one image: ids and its tiles (n, C, H, W)."""
    out = process_one(processor, f"{family.image_placeholder}{text}", image)
    return Encoded(out["input_ids"][0].tolist(), [{"pixel_values": out["pixel_values"]}])


def collate_images(
    family: Family, processor: Any, batch: Sequence[Encoded], text: dict[str, torch.Tensor], pin: bool = False
) -> dict[str, torch.Tensor]:
    """The tiles of every image of every sample, in order: (sum of tiles, C, H, W)."""
    return {"pixel_values": host_cat([image["pixel_values"] for enc in batch for image in enc.images], pin)}


INTERNVL = Family(
    name="InternVL",
    model_types=("internvl",),
    image_token=IMG_CONTEXT,
    round_separator="\n",
    stop_strings=("\n", "<|im_end|>", "Question:", "Caption:"),
    start_tokens=("<|endoftext|>",),
    required_tokens=("<img>", IMG_CONTEXT, "</img>"),
    encode_image=encode_image,
    collate_images=collate_images,
)
