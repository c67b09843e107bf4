"""Capture per-layer states of the language model's decoder at chosen positions (forward hooks).

The layer target says which state is aligned between teacher and student:
``mlp`` — the MLP output before the residual add (what the official MimIC code aligns);
``layer`` — the decoder layer's output (the residual stream); ``attn`` — the self-attention output.
Hooks attach by module identity to ``model.get_decoder().layers[i]`` (never vision towers).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families.base import decoder_layers
from pipeline.settings import LAYER_TARGETS


def _target_module(layer: nn.Module, target: str) -> nn.Module:
    if target == "mlp":
        return layer.mlp
    if target == "attn":
        return layer.self_attn
    if target == "layer":
        return layer
    raise ValueError(f"unknown layer target '{target}'; valid: {', '.join(LAYER_TARGETS)}")


class StateCapture:
    """Record ``target`` states of every decoder layer during forwards inside a ``with`` block.

    Set ``positions`` (B, S) long before a forward to keep only those token positions (gathered
    on the device, so a long teacher sequence never leaves the GPU whole). After the forward,
    ``stacked()`` returns (B, S, L, D) (or (B, T, L, D) without positions). Gradients flow through
    the captured states (students train on them).
    """

    def __init__(self, model: nn.Module, target: str = "mlp", layers: list[int] | None = None):
        all_layers = decoder_layers(model)
        self.layer_ids = list(range(len(all_layers))) if layers is None else list(layers)
        self.modules = [_target_module(all_layers[i], target) for i in self.layer_ids]
        self.target = target
        self.positions: torch.Tensor | None = None
        self.states: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list = []

    def _hook(self, index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self.positions is not None:
                idx = self.positions[..., None].expand(-1, -1, hidden.shape[-1])
                hidden = torch.gather(hidden, 1, idx)
            self.states[index] = hidden

        return hook

    def __enter__(self) -> StateCapture:
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def stacked(self) -> torch.Tensor:
        """(B, S, L, D): the states of the last forward, layers in order."""
        if any(s is None for s in self.states):
            raise RuntimeError("no states captured: run a forward inside the `with StateCapture(...)` block")
        out = torch.stack(self.states, dim=2)
        self.states = [None] * len(self.modules)
        return out


def span_positions(lengths: list[int], span_starts: list[int], width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and validity of each sample's aligned span in a right-padded batch.

    Sample b occupies positions [0, lengths[b]); its span is [span_starts[b], lengths[b]).
    Returns positions (B, width) long (clamped into range) and mask (B, width) bool.
    """
    offsets = torch.arange(width, device=device)[None, :]
    starts = torch.tensor(span_starts, device=device)[:, None]
    ends = torch.tensor(lengths, device=device)[:, None]
    pos = starts + offsets
    mask = pos < ends
    return torch.minimum(pos, ends - 1), mask
