"""MimIC inside HuggingFace models through transformers' attention interface.

We register one attention function and its mask function under ``ATTN_NAME``. The function runs
the stock sdpa attention (the same kernel as the base model) and, for the decoder self-attention
modules that carry MimIC heads, adds mu(q) v.

With v = 0 the logits are bit-identical to the stock sdpa model's *with the same requires_grad flags
on the base parameters*. Attaching freezes the base (requires_grad False), and that alone can change
the last bits: PyTorch's CPU ``F.linear`` on a non-contiguous input (LLaVA-OneVision's projector)
picks another kernel when its weight requires grad, even under ``no_grad``. So compare a student
with v = 0 against the frozen base model; ``detach()`` restores every flag as it was before the
attach, and with it the base model's exact outputs.
Heads are attached by module identity to ``model.get_decoder().layers[i].self_attn`` — vision
towers, the perceiver and Idefics1's gated cross-attention call the same function but carry no
heads, so they pass through untouched. Parameters live outside the base model (a plain attribute
in the module's ``__dict__``, not a registered submodule), so the base state dict never changes.
Any heads with MimicHeads' ``add_shift(out, query, key, attention_mask, scaling, is_causal)`` attach
the same way (``AttentionHeads``: HiFICL's ``pipeline.hificl.HificlHeads`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.config import UserError
from pipeline.families.base import decoder_layers
from pipeline.methods.base import StudentHandle, Switch, freeze_base
from pipeline.mimic import MimicHeads

ATTN_NAME = "mimic"
_STATE_KEY = "_mimic_state"


class AttentionHeads(Protocol):
    """What the attention function calls on a layer's heads: ``MimicHeads``, ``HificlHeads``."""

    def add_shift(self, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, is_causal: bool = True) -> torch.Tensor: ...


@dataclass
class _HeadState:
    heads: MimicHeads | AttentionHeads
    switch: Switch
    called: bool = field(default=False)  # a flag, not a count: a changing int would recompile a compiled forward


def mimic_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Stock sdpa attention plus mu(q) v on modules that carry MimIC heads.

    query (B, H, Tq, D), key/value (B, Hkv, Tkv, D) post-RoPE, not repeated for GQA; mask bool
    (B, 1, Tq, Tkv) True = attend, additive float, or None. Returns ((B, Tq, H, D), None).
    """
    out, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    state: _HeadState | None = module.__dict__.get(_STATE_KEY)
    if state is None:
        return out, weights
    if not state.called:
        state.called = True
    if not state.switch.enabled:
        return out, weights
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # read as sdpa_attention_forward reads it, so that log Z2 sees the keys the output saw
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    return state.heads.add_shift(out, query, key, attention_mask, scale, is_causal=is_causal), weights


def register_mimic_attention() -> None:
    """Register the attention function and its mask function (idempotent).

    The mask registration matters: without it ``create_causal_mask`` returns None for an unknown
    implementation and padding would be silently ignored.
    """
    AttentionInterface.register(ATTN_NAME, mimic_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def route_attention(model: nn.Module, spec: str | dict[str, str]) -> None:
    """Send the model's attention through ``spec`` (the family's ``attn_implementation(ATTN_NAME)``:
    a string, or ``{"text_config": ...}`` to route only the language model)."""
    register_mimic_attention()
    model.set_attn_implementation(spec)


def _check_routed(attn: nn.Module, index: int) -> None:
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl != ATTN_NAME:
        raise RuntimeError(
            f"decoder layer {index} self-attention runs attn_implementation={impl!r}, not {ATTN_NAME!r}: "
            "MimIC would silently do nothing. Load the model with the family's attn_implementation "
            "(pipeline.families) or call pipeline.attention.route_attention(model, family.attn_implementation('mimic'))."
        )


def _check_supported(attn: nn.Module, index: int) -> None:
    """Refuse attention features whose normaliser log Z2 would differ from the one computed here."""
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap is not None:
        # log Z2 is the logsumexp of the raw scaled logits, which is what sdpa (and Gemma 3 in
        # transformers 5.x, which never passes its softcap to the attention function) normalise; a
        # capped model's normaliser would be another quantity.
        raise UserError(
            f"decoder layer {index} is configured with attention logit softcapping "
            f"(attn_logit_softcapping={softcap}), which MimIC does not support; use the model's config with "
            "attn_logit_softcapping null (as the released Gemma 3 models have it)"
        )


def _call_check_hook(model: nn.Module, states: list[_HeadState]) -> object:
    """After the first forward with the student enabled, every attached layer must have been called."""

    def hook(_module, _args, _output):
        if not states or not states[0].switch.enabled:
            return
        missing = [i for i, s in enumerate(states) if not s.called]
        handle.remove()
        if missing:
            raise RuntimeError(
                f"decoder layers {missing} never called the registered attention function: this model's "
                "attention does not go through transformers' attention interface, so MimIC cannot act on it"
            )

    handle = model.get_decoder().register_forward_hook(hook)
    return handle


def attach_mimic(model: nn.Module, heads: Sequence[MimicHeads | AttentionHeads]) -> StudentHandle:
    """Attach one ``MimicHeads`` (or other ``AttentionHeads`` module) per decoder layer by module
    identity; freeze the base model (until ``detach()``, which restores each parameter's requires_grad).

    ``heads`` must have one entry per decoder layer, sized for that layer's heads.
    """
    register_mimic_attention()
    layers = decoder_layers(model)
    if len(heads) != len(layers):
        raise ValueError(f"got MimIC heads for {len(heads)} layers, the model has {len(layers)} decoder layers")
    # every check before the first change, so a refused attach leaves the model untouched
    for i, layer in enumerate(layers):
        _check_routed(layer.self_attn, i)
        _check_supported(layer.self_attn, i)
        if _STATE_KEY in layer.self_attn.__dict__:
            raise RuntimeError(f"decoder layer {i} already carries a student; detach it first")
    switch, states, undo = Switch(), [], [freeze_base(model)]
    for layer, layer_heads in zip(layers, heads, strict=True):
        attn = layer.self_attn
        layer_heads.to(next(model.parameters()).device)
        state = _HeadState(layer_heads, switch)
        attn.__dict__[_STATE_KEY] = state
        states.append(state)
        undo.append(lambda attn=attn: attn.__dict__.pop(_STATE_KEY, None))
    hook = _call_check_hook(model, states)
    undo.append(hook.remove)
    return StudentHandle(model, switch, undo)
