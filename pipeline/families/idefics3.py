"""Idefics3 and SmolVLM: Llama decoder, SigLIP tower, pixel-shuffle connector, image splitting.

The processor expands ``<image>`` per crop into ``<fake_token_around_image><row_i_col_j>`` + N
``<image>`` tokens, with ``\\n`` between rows and a final ``<global-img>`` crop (rows x cols + 1 crops).
Crops are collated as Idefics2's. SmolVLM is a distinct ``model_type`` with the same layout.
"""

from __future__ import annotations

from .base import Family
from .idefics2 import END_OF_UTTERANCE, collate_crops, encode_crops

IDEFICS3 = Family(
    name="Idefics3/SmolVLM",
    model_types=("idefics3", "smolvlm"),
    image_token="<image>",
    round_separator=f"{END_OF_UTTERANCE}\n",
    stop_strings=("\n", END_OF_UTTERANCE, "Question:", "Caption:"),
    required_tokens=("<image>", "<fake_token_around_image>", "<global-img>", END_OF_UTTERANCE),
    encode_image=encode_crops,
    collate_images=collate_crops,
)
