"""HiFICL (Li et al., CVPR 2026): n learnable low-rank virtual key/value pairs per decoder
self-attention head, attended to exactly with the real keys (the math in ``pipeline.hificl``, the
hook in ``pipeline.attention``, shared with MimIC).

Its two settings are recorded in ``adapter_config.json`` under ``lora`` (the mapping of a student's
low-rank settings; HiFICL's code calls its rank ``lora_rank``): ``{"n": virtual tokens, "rank": r}``.
The defaults are the official recipe's; a saved student is rebuilt from what its config records.
Trained with cross-entropy only by default (the recipe: ``ce_loss_weight 1, align_loss_weight 0``);
``--align mse`` (or kl, l2sum) adds the alignment to the teacher store.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.attention import attach_mimic
from pipeline.hificl import DEFAULT_RANK, DEFAULT_TOKENS, HificlHeads
from pipeline.methods import MethodSpec
from pipeline.methods.base import ModuleAttachment
from pipeline.mimic import MuKernels

KEYS = ("n", "rank")


def build(config: Any) -> nn.ModuleList:
    """One ``HificlHeads`` per decoder layer, sharing one ``MuKernels`` (the log Z2 backend choice)."""
    kernels = MuKernels()
    return nn.ModuleList(HificlHeads(config.num_heads, config.head_dim, config.lora["n"], config.lora["rank"], kernels)
                         for _ in range(config.num_layers))


def attach(config: Any, model: nn.Module) -> ModuleAttachment:
    heads = build(config)
    return ModuleAttachment(heads, attach_mimic(model, heads))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check(config: Any) -> str | None:
    settings = config.lora
    missing = [k for k in KEYS if k not in settings]
    unknown = sorted(set(settings) - set(KEYS))
    if missing or unknown:
        return f"'lora' of a HiFICL student is {settings!r}, expected exactly the keys {list(KEYS)}"
    for key, what in (("n", "virtual tokens per head"), ("rank", "rank of the virtual keys and values")):
        if not _positive_int(settings[key]):
            return f"'lora.{key}' ({what}) is {settings[key]!r}, expected a positive integer"
    return None


SPEC = MethodSpec(
    name="hificl", summary="n low-rank virtual key/value pairs per head, attended to exactly (HiFICL)",
    attach=attach, build=build, check=check,
    settings=lambda model, variant: {"lora": {"n": DEFAULT_TOKENS, "rank": DEFAULT_RANK}},
    describe=lambda config: f"hificl n={config.lora['n']} r={config.lora['rank']}",
    default_lr=5e-3,  # the recipe's peft/hifi.yaml (hifi-code-qwenvl): lr 5e-3
    default_align="none",
)
