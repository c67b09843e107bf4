"""Model families as data keyed by ``config.model_type`` (never by substrings of model names).

``family_for(config)`` picks the family; ``decoder_layers`` and ``attention_geometry`` read the language
model; ``Family.bos / encode / collate`` build model inputs (see ``base.py``).
"""

from __future__ import annotations

from typing import Any

from .base import Encoded, Family, Geometry, Segment, attention_geometry, decoder_layers, tokenizer_of
from .gemma3 import GEMMA3
from .idefics import IDEFICS
from .idefics2 import IDEFICS2
from .idefics3 import IDEFICS3
from .internvl import INTERNVL
from .llama import LLAMA
from .llava import LLAVA
from .qwen2_vl import QWEN2_VL
from .qwen3_vl import QWEN3_VL

FAMILIES: tuple[Family, ...] = (IDEFICS, IDEFICS2, IDEFICS3, LLAVA, QWEN2_VL, QWEN3_VL, GEMMA3, INTERNVL, LLAMA)
"""Every supported family."""

BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
"""``config.model_type`` -> family."""


def supported_model_types() -> str:
    """One line per family: its name and model types (used in error messages)."""
    return "; ".join(f"{f.name}: {', '.join(f.model_types)}" for f in FAMILIES)


def family_for(config: Any) -> Family:
    """The family of a model config (or of a model: its ``.config``), by ``config.model_type``."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(
            f"unsupported model_type {model_type!r} ({type(config).__name__}); supported model types by "
            f"family: {supported_model_types()}. A new family is a Family entry in pipeline/families/."
        )
    return BY_MODEL_TYPE[model_type]


__all__ = [
    "BY_MODEL_TYPE",
    "FAMILIES",
    "Encoded",
    "Family",
    "Geometry",
    "Segment",
    "attention_geometry",
    "decoder_layers",
    "family_for",
    "supported_model_types",
    "tokenizer_of",
]
