"""Idefics2: Mistral decoder, SigLIP tower, perceiver resampler (64 ``<image>`` tokens per crop).

Rounds end with ``<end_of_utterance>\\n`` (the official MimIC code writes ``<end_of_outterance>``, a
typo that tokenises into pieces; docs/architecture.md §7). Images travel as crops: ``pixel_values``
(B, N_crops, C, H, W) and ``pixel_attention_mask`` (B, N_crops, H, W), zero-padded; the model drops
all-zero crops, so samples with fewer images are padded with zero crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Encoded, Family, host_zeros, process_one

END_OF_UTTERANCE = "<end_of_utterance>"


def encode_crops(family: Family, processor: Any, text: str, image: Any) -> Encoded:
    """The processor on ``<image>`` + text with this one image: ids and crops (n, C, H, W) + mask (n, H, W)."""
    out = process_one(processor, f"{family.image_placeholder}{text}", image)
    pixels = out["pixel_values"][0]
    mask = out.get("pixel_attention_mask")
    # bool, not the processor's int64: the model only tests it for > 0 (and builds a bool one when none is
    # given); int64 made it 8 bytes a pixel, 40% of what an 8-shot batch moves between processes
    mask = mask[0].bool() if mask is not None else torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool)
    return Encoded(out["input_ids"][0].tolist(), [{"pixel_values": pixels, "pixel_attention_mask": mask}])


def collate_crops(
    family: Family, processor: Any, batch: Sequence[Encoded], text: dict[str, torch.Tensor], pin: bool = False
) -> dict[str, torch.Tensor]:
    """Crops of each sample in order, padded bottom-right to the largest crop and with zero crops."""
    crops = [image["pixel_values"] for enc in batch for image in enc.images]
    channels = crops[0].shape[1]
    height = max(c.shape[-2] for c in crops)
    width = max(c.shape[-1] for c in crops)
    n_max = max(sum(image["pixel_values"].shape[0] for image in enc.images) for enc in batch)
    pixel_values = host_zeros((len(batch), n_max, channels, height, width), crops[0].dtype, pin)
    mask = host_zeros((len(batch), n_max, height, width), torch.bool, pin)
    for i, enc in enumerate(batch):
        pixels = [image["pixel_values"] for image in enc.images]
        if pixels and all(p.shape[-2:] == (height, width) for p in pixels):  # one copy per sample, not per crop
            n = sum(p.shape[0] for p in pixels)
            torch.cat(pixels, out=pixel_values[i, :n])
            torch.cat([image["pixel_attention_mask"] for image in enc.images], out=mask[i, :n])
            continue
        start = 0
        for image in enc.images:
            pix, pmask = image["pixel_values"], image["pixel_attention_mask"]
            n, _, h, w = pix.shape
            pixel_values[i, start : start + n, :, :h, :w] = pix
            mask[i, start : start + n, :h, :w] = pmask
            start += n
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask}


IDEFICS2 = Family(
    name="Idefics2",
    model_types=("idefics2",),
    image_token="<image>",
    round_separator=f"{END_OF_UTTERANCE}\n",
    stop_strings=("\n", END_OF_UTTERANCE, "Question:", "Caption:"),
    required_tokens=("<image>", "<fake_token_around_image>", END_OF_UTTERANCE),
    encode_image=encode_crops,
    collate_images=collate_crops,
)
