"""Gemma 3 (``Gemma3ForConditionalGeneration``): Gemma 3 decoder, SigLIP tower, pooled soft tokens.

A prompt writes ``<start_of_image>``; the processor replaces it by ``\\n\\n<start_of_image>`` +
``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>\\n\\n`` (256 in the released models;
pan-and-scan off, as the processor's default). ``pixel_values`` are one fixed-size view per image
(N_img, C, H, W). The soft tokens of one image attend to each other bidirectionally: the model builds
that mask from ``token_type_ids`` (1 on soft tokens), which collate passes as the processor would.

Attention: scale ``query_pre_attn_scalar ** -0.5`` (the module's ``scaling``, passed to the attention
function), local layers with a sliding window interleaved with global ones (both applied through the
mask the attention function receives), q/k RMS norms. ``attn_logit_softcapping`` is null in the
released Gemma 3 configs; MimIC refuses a model that sets it (pipeline/attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Encoded, Family, host_stack, process_one

BOI = "<start_of_image>"
SOFT_TOKEN = "<image_soft_token>"
EOI = "<end_of_image>"


def encode_image(family: Family, processor: Any, text: str, image: Any) -> Encoded:
    """The processor on ``<start_of_image>`` + text with this one image: ids and pixel_values (C, H, W)."""
    out = process_one(processor, f"{family.image_placeholder}{text}", image)
    return Encoded(out["input_ids"][0].tolist(), [{"pixel_values": out["pixel_values"][0]}])


def collate_images(
    family: Family, processor: Any, batch: Sequence[Encoded], text: dict[str, torch.Tensor], pin: bool = False
) -> dict[str, torch.Tensor]:
    """pixel_values (N, C, H, W) and token_type_ids (B, T): 1 on real ``<image_soft_token>`` positions."""
    images = [image for enc in batch for image in enc.images]
    soft_id = processor.tokenizer.convert_tokens_to_ids(SOFT_TOKEN)
    is_image = (text["input_ids"] == soft_id) & text["attention_mask"].bool()
    return {
        "pixel_values": host_stack([image["pixel_values"] for image in images], pin),
        "token_type_ids": is_image.to(torch.long),
    }


GEMMA3 = Family(
    name="Gemma 3",
    model_types=("gemma3",),
    image_token=SOFT_TOKEN,
    image_prompt=BOI,
    round_separator="\n",
    stop_strings=("\n", "<end_of_turn>", "Question:", "Caption:"),
    required_tokens=(BOI, SOFT_TOKEN, EOI),
    encode_image=encode_image,
    collate_images=collate_images,
)
