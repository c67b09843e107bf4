"""MimIC and LoRA at once (the official MimIC code's ``run_mimic_lora.sh``; the paper reports that
they stack): MimIC heads in every decoder self-attention head and PEFT LoRA on the same layers'
projections, each part built and attached by its own method module (``mimic``, ``lora``).

The parts keep their own tensors under a prefix (``mimic.0.shift``, ``lora.<module>.lora_A.weight``)
and their own learning rate: ``--lr`` for MimIC (default 5e-3, MimIC's) and ``--lora-lr`` for LoRA
(default 1e-3, LoRA's), through ``MethodSpec.param_lr``. ``adapter_config.json`` records MimIC's
``variant`` and LoRA's ``lora`` settings as the two methods do. The official script differs: one
learning rate (5e-3) and rank 1 on ``o_proj`` only; here LoRA takes its own method's settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from pipeline.config import UserError
from pipeline.methods import Attachment, MethodSpec
from pipeline.methods import lora as lora_method
from pipeline.methods import mimic as mimic_method

PARTS = ("mimic", "lora")
"""Tensor and parameter name prefixes, in attach order (detached in reverse)."""


class ComposedAttachment:
    """Several attachments on one model, each under its name: ``trainable()`` and ``tensors()`` prefix
    every name with ``<part>.``; ``load_tensors`` hands each part its own; ``disabled()`` turns every
    part off; ``detach()`` removes them last to first."""

    def __init__(self, parts: dict[str, Attachment]):
        self.parts = parts

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{part}.{n}", p) for part, a in self.parts.items() for n, p in a.trainable()]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": v for part, a in self.parts.items() for k, v in a.tensors().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in tensors if k.partition(".")[0] not in self.parts]
        if unknown:
            raise UserError(f"tensors {unknown[:4]} belong to none of the parts {list(self.parts)}")
        for part, a in self.parts.items():
            a.load_tensors({k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(f"{part}.")})

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with ExitStack() as stack:
            for a in self.parts.values():
                stack.enter_context(a.disabled())
            yield

    def train(self, mode: bool = True) -> None:
        for a in self.parts.values():
            a.train(mode)

    @property
    def training(self) -> bool:
        return any(a.training for a in self.parts.values())

    def detach(self) -> None:
        for a in reversed(list(self.parts.values())):
            a.detach()


def attach(config: Any, model: nn.Module) -> ComposedAttachment:
    """MimIC heads first (freezing the base), then LoRA; a failure half-way leaves the model as it came."""
    parts: dict[str, Attachment] = {}
    try:
        parts["mimic"] = mimic_method.attach(config, model)
        parts["lora"] = lora_method.attach(config, model)
    except BaseException:
        ComposedAttachment(parts).detach()
        raise
    return ComposedAttachment(parts)


def expected_shapes(config: Any, model: nn.Module | None = None) -> dict[str, tuple[int | None, ...]]:
    return {**{f"mimic.{k}": v for k, v in mimic_method.SPEC.shapes(config, model).items()},
            **{f"lora.{k}": v for k, v in lora_method.expected_shapes(config, model).items()}}


def check(config: Any) -> str | None:
    return mimic_method.check(config) or lora_method.check(config)


def param_lr(train_config: Any, lr: float, name: str) -> float:
    """``--lr`` for the MimIC part, ``--lora-lr`` for the LoRA part."""
    return train_config.lora_lr if name.startswith("lora.") else lr


SPEC = MethodSpec(
    name="mimic-lora", summary="MimIC heads and LoRA (PEFT) on the decoder self-attention at once",
    attach=attach, expected_shapes=expected_shapes, check=check,
    settings=lambda model, variant: {**mimic_method.SPEC.settings(model, variant),
                                     **lora_method.SPEC.settings(model, variant)},
    describe=lambda config: f"mimic/{config.variant} + lora r={config.lora['r']}",
    default_lr=mimic_method.SPEC.default_lr, default_align=mimic_method.SPEC.default_align, param_lr=param_lr,
)
