"""LIVE (Peng et al., NeurIPS 2024): one norm-preserving vector per decoder layer on the MLP output
(the math in ``pipeline.live``); trained with KL on the stored top-k teacher logits plus CE."""

from __future__ import annotations

from typing import Any

from pipeline.families.base import decoder_layers
from pipeline.live import LiveVectors
from pipeline.methods import MethodSpec
from pipeline.methods.base import ModuleAttachment, attach_output_hooks


def build(config: Any) -> LiveVectors:
    return LiveVectors(config.num_layers, config.hidden_size)


def attach_live(model: Any, live: LiveVectors) -> ModuleAttachment:
    """A forward hook on each decoder layer's MLP adds its norm-preserving shift."""
    layers = decoder_layers(model)
    if live.vectors.shape[0] != len(layers):
        raise ValueError(f"LIVE vectors for {live.vectors.shape[0]} layers, the model has {len(layers)}")
    return attach_output_hooks(model, live, [layer.mlp for layer in layers], live.shift)


SPEC = MethodSpec(
    name="live", summary="one norm-preserving vector per layer on the MLP output (LIVE)",
    attach=lambda config, model: attach_live(model, build(config)), build=build, default_align="kl",
)
