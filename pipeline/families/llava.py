"""LLaVA, LLaVA-NeXT and LLaVA-OneVision: a vision tower whose projected patches replace ``<image>`` tokens.

LLaVA: one fixed-size image, ``pixel_values`` flat (N_img, C, H, W). NeXT / OneVision ("anyres"): each
image is a base view plus grid tiles, ``pixel_values`` (N_img, P_max, C, H, W) zero-padded over tiles,
and ``image_sizes`` (N_img, 2); the token count depends on the image's size.

OneVision's processor gives an image of a multi-image prompt fewer tokens (base view only) than a
single image. A query must be encoded the same in the teacher (k+1 images) and the student (1 image),
so every image is encoded alone, as a single image (anyres), and collate passes no
``batch_num_images``: the model then treats every image as anyres too, matching the token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Encoded, Family, host_stack, host_zeros, process_one


def encode_image(family: Family, processor: Any, text: str, image: Any) -> Encoded:
    """The processor on ``<image>`` + text with this one image; keeps pixel_values and image_sizes."""
    out = process_one(processor, f"{family.image_placeholder}{text}", image)
    tensors = {"pixel_values": out["pixel_values"][0]}
    if "image_sizes" in out:
        tensors["image_sizes"] = torch.as_tensor(out["image_sizes"][0])
    return Encoded(out["input_ids"][0].tolist(), [tensors])


def collate_images(
    family: Family, processor: Any, batch: Sequence[Encoded], text: dict[str, torch.Tensor], pin: bool = False
) -> dict[str, torch.Tensor]:
    """Images of all samples in order: (N, C, H, W), or (N, P_max, C, H, W) + image_sizes (N, 2)."""
    images = [image for enc in batch for image in enc.images]
    if "image_sizes" not in images[0]:
        return {"pixel_values": host_stack([image["pixel_values"] for image in images], pin)}
    tiles = [image["pixel_values"] for image in images]
    p_max = max(t.shape[0] for t in tiles)
    pixel_values = host_zeros((len(tiles), p_max, *tiles[0].shape[1:]), tiles[0].dtype, pin)
    for i, t in enumerate(tiles):
        pixel_values[i, : t.shape[0]] = t
    return {"pixel_values": pixel_values, "image_sizes": torch.stack([image["image_sizes"] for image in images])}


LLAVA = Family(
    name="LLaVA",
    model_types=("llava", "llava_next", "llava_onevision"),
    image_token="<image>",
    round_separator="\n",
    required_tokens=("<image>",),
    encode_image=encode_image,
    collate_images=collate_images,
)
