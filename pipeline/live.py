"""The LIVE baseline (Peng et al., "Learnable In-Context Vector", NeurIPS 2024), pure torch.

One learned vector v_l and scale a_l per decoder layer, added to the layer's MLP output and then
rescaled to the norm the output had (norm-preserving):

    h' = (h + a_l v_l) * ||h|| / ||h + a_l v_l||

v starts at zero, so a fresh module leaves the model unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class LiveVectors(nn.Module):
    """Per-layer shift vectors ``vectors`` (L, D) and scales ``alpha`` (L,)."""

    def __init__(self, num_layers: int, hidden_size: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.alpha = nn.Parameter(torch.ones(num_layers))

    def shift(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Apply layer ``layer``'s shift to ``hidden`` (..., D); returns the same shape and dtype."""
        h = hidden.float()
        shifted = h + self.alpha[layer].float() * self.vectors[layer].float()
        norm_in = h.norm(dim=-1, keepdim=True)
        norm_out = shifted.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return (shifted * (norm_in / norm_out)).to(hidden.dtype)
