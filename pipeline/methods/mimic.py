"""MimIC (Jiang et al., CVPR 2025): a shift vector and a linear log Z1 estimate in every decoder
self-attention head (the math in ``pipeline.mimic``, the hook in ``pipeline.attention``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.attention import attach_mimic
from pipeline.methods import MethodSpec
from pipeline.methods.base import ModuleAttachment
from pipeline.mimic import MimicHeads, MuKernels
from pipeline.settings import VARIANTS


def build(config: Any) -> nn.ModuleList:
    """One ``MimicHeads`` per decoder layer (v = 0: the identity at step 0), sharing one ``MuKernels``
    (the default path choice; its flex block mask is built once per forward for all layers)."""
    kernels = MuKernels()
    return nn.ModuleList(MimicHeads(config.num_heads, config.head_dim, config.variant, kernels)
                         for _ in range(config.num_layers))


def attach(config: Any, model: nn.Module) -> ModuleAttachment:
    heads = build(config)
    return ModuleAttachment(heads, attach_mimic(model, heads))


def check(config: Any) -> str | None:
    if config.variant not in VARIANTS:
        return f"unknown MimIC variant {config.variant!r}; valid: {', '.join(VARIANTS)}"
    return None


SPEC = MethodSpec(
    name="mimic", summary="per-head shift and mu(q) = sigmoid(f(q) - log Z2) (MimIC, the default)",
    attach=attach, build=build, settings=lambda model, variant: {"variant": variant}, check=check,
    describe=lambda config: f"mimic/{config.variant}", default_align="mse",
)
