"""What the pipeline needs to know about a model family, as data keyed by ``config.model_type``.

Contract used by prompts.py, attention.py and the stages:

- ``Segment``: one piece of an interleaved prompt: an optional image shown *before* its text.
- ``Encoded``: the token ids of one or more segments plus, per image, the processor's tensors.
  Encodings concatenate (``a + b``): a teacher sequence is ``bos + demo_1 + ... + demo_k + query``.
- ``Family``: per family, how to encode a segment with the family's processor (image placeholder
  tokens expanded exactly as the processor does), how to collate encodings into model inputs
  (padding side, attention mask, pixel tensors, Idefics1's image_attention_mask), the separator
  between rounds and the stop strings for generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Segment:
    """One piece of an interleaved prompt. ``image`` (PIL image or None) is shown before ``text``."""

    text: str
    image: Any = None


@dataclass
class Encoded:
    """Token ids of a run of segments and the per-image processor tensors, in order of appearance.

    input_ids: token ids, no padding.
    images: one dict per image, e.g. ``{"pixel_values": (C, H, W)}`` or Idefics2's
        ``{"pixel_values": (n_crops, C, H, W), "pixel_attention_mask": (n_crops, H, W)}``; the family's
        ``collate`` knows how to stack them.
    """

    input_ids: list[int]
    images: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: Encoded) -> Encoded:
        return Encoded(self.input_ids + other.input_ids, self.images + other.images)

    def __len__(self) -> int:
        return len(self.input_ids)
