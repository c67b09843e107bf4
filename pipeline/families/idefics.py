"""Idefics (v1): LLaMA decoder with gated cross-attention to images; one ``<image>`` token per image.

The processor writes ``<fake_token_around_image><image><fake_token_around_image>`` for an image and
gives the model ``pixel_values`` (B, N_img, C, H, W) plus ``image_attention_mask`` (B, T, N_img): each
text token cross-attends to the most recent image at or before it; after an EOS token no image until
the next one (``image_attention_mask_for_packed_input_ids`` in transformers' processing_idefics.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Encoded, Family, host_zeros, real_positions, tokenizer_of

FAKE = "<fake_token_around_image>"
IMAGE = "<image>"


def encode_image(family: Family, processor: Any, text: str, image: Any) -> Encoded:
    """``<fake><image><fake>`` + text, tokenised as the processor does (no BOS); pixels (C, H, W).

    The processor also strips spaces around each text item; we keep the text as the template wrote it.
    """
    tok = tokenizer_of(processor)
    ids = tok(f"{FAKE}{IMAGE}{FAKE}{text}", add_special_tokens=False)["input_ids"]
    pixels = processor.image_processor([image], return_tensors="pt")
    pixels = pixels["pixel_values"] if not isinstance(pixels, torch.Tensor) else pixels
    return Encoded(list(ids), [{"pixel_values": pixels[0]}])


def image_attention_indices(input_ids: Sequence[int], image_token_id: int, eos_token_id: int | None) -> list[int]:
    """Per token, the index of the image it cross-attends to, or -1 (the processor's rule).

    A token attends to the latest image token at or before it; tokens after an EOS attend to none until
    the next image token.
    """
    out, count, seen_eos = [], -1, False
    for token in input_ids:
        if token == image_token_id:
            count += 1
            seen_eos = False
        out.append(-1 if seen_eos else count)
        if token == eos_token_id:
            seen_eos = True
    return out


def collate_images(
    family: Family, processor: Any, batch: Sequence[Encoded], text: dict[str, torch.Tensor], pin: bool = False
) -> dict[str, torch.Tensor]:
    """pixel_values (B, N_max, C, H, W) zero-padded (N_max >= 1) and image_attention_mask (B, T, N_max)."""
    tok = tokenizer_of(processor)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    n_max = max(1, max(len(e.images) for e in batch))
    c, h, w = _image_dims(processor, batch)
    pixel_values = host_zeros((len(batch), n_max, c, h, w), torch.float32, pin)
    mask = torch.zeros(len(batch), text["input_ids"].shape[1], n_max, dtype=torch.long)
    for i, (enc, cols) in enumerate(zip(batch, real_positions(text["attention_mask"]), strict=True)):
        for j, image in enumerate(enc.images):
            pixel_values[i, j] = image["pixel_values"]
        indices = torch.tensor(image_attention_indices(enc.input_ids, image_id, tok.eos_token_id))
        attends = indices >= 0
        mask[i, cols[attends], indices[attends]] = 1
    return {"pixel_values": pixel_values, "image_attention_mask": mask}


def _image_dims(processor: Any, batch: Sequence[Encoded]) -> tuple[int, int, int]:
    for enc in batch:
        for image in enc.images:
            return tuple(image["pixel_values"].shape)
    ip = processor.image_processor
    size = getattr(ip, "image_size", None) or ip.size["height"]
    return (getattr(ip, "image_num_channels", 3), size, size)


IDEFICS = Family(
    name="Idefics",
    model_types=("idefics",),
    image_token=IMAGE,
    image_prompt=f"{FAKE}{IMAGE}{FAKE}",
    round_separator="\n",
    lm_is_sub_config=False,
    required_tokens=(IMAGE, FAKE),
    encode_image=encode_image,
    collate_images=collate_images,
    images_always=True,
)
