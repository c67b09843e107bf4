"""Shared fixtures: offline hub settings, tiny models of every family, synthetic images."""

from __future__ import annotations

import os

# before anything imports transformers / huggingface_hub: never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from typing import Any, NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import FAMILIES, build_tiny  # noqa: E402
from tiny_models import synthetic_image as _synthetic_image

# Tiny models are latency-bound: with 2 intra-op threads on a shared 2-core machine a 32-wide forward
# took 0.4-0.6 s (threads spin against other processes), with 1 thread 2-4 ms.
torch.set_num_threads(1)


class TinyFamily(NamedTuple):
    """A tiny model of one family: ``name`` (its model_type), model, processor and ``Family``."""

    name: str
    model: Any
    processor: Any
    family: Any


def tiny(name: str) -> TinyFamily:
    """The cached tiny model of ``name``; skips the test when an optional dependency is missing."""
    from pipeline.families import family_for

    try:
        model, processor = build_tiny(name)
    except ImportError as e:  # SmolVLM's processor needs num2words
        pytest.skip(f"tiny {name} cannot be built here: {e}")
    return TinyFamily(name, model, processor, family_for(model.config))


@pytest.fixture(params=FAMILIES)
def tiny_family(request: pytest.FixtureRequest) -> TinyFamily:
    """Each supported family in turn (``name``, ``model``, ``processor``, ``family``)."""
    return tiny(request.param)


@pytest.fixture
def synthetic_image() -> Any:
    """``synthetic_image(seed, size=(56, 56))``: a seeded small PIL RGB image with drawn shapes."""
    return _synthetic_image
