"""HiFICL, pure torch (Li et al., *High-Fidelity In-Context Learning for Multimodal Tasks*, CVPR 2026,
arXiv 2603.12760).

MimIC (``pipeline.mimic``) learns the demonstrations' term of the exact decomposition

    SA(q, [K_D; K], [V_D; V]) = Z2/(Z1 + Z2) SA(q, K, V) + 1/(Z1 + Z2) sum_i exp(q.k_i^D s) v_i^D

through a shift vector and a linear stand-in for log Z1. HiFICL keeps the formula itself and learns
the demonstrations: per head, ``n`` virtual keys and values in low rank, K_v = A_K B_K and
V_v = A_V B_V (A: n x r, B: r x D), so the head output *is* attention over the virtual keys prepended
to the real ones:

    out(q) = Z2/(Z1 + Z2) SA(q, K, V) + 1/(Z1 + Z2) sum_i exp(q.k_v,i s) v_v,i,    Z1 = sum_i exp(q.k_v,i s)

Z2 is the masked normaliser of the head's own attention (``pipeline.mimic.masked_log_z2``: causal,
padding and sliding-window masks, GQA key heads shared: exactly the keys sdpa attends to). The
official code takes Z2 over every key slot, padding and future tokens included; this one does not.
Everything is computed in log space: log(Z1 + Z2) = logaddexp(log Z1, log Z2).

Initialisation as the official code's ``AttnApproximatorDirect_final``: A_K, A_V ~ N(0, 1),
B_K ~ N(0, 0.01^2), B_V = 0. So V_v = 0 at step 0 and the second term vanishes — but the first is
damped by Z2/(Z1 + Z2) < 1: unlike MimIC with v = 0, a fresh HiFICL student is *not* the base model
(exact attention over n keys with zero values is not the identity). ``add_shift`` is the formula;
nothing is special-cased at initialisation.

Rows with no visible real key (padding queries) are left as they are, as MimIC leaves them (its mu
is zeroed there).

No transformers, no files: this module only knows tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.mimic import MuKernels, masked_log_z2

DEFAULT_TOKENS = 8
"""Virtual key/value pairs per head: ``num_virtual_tokens: 8`` of the official recipe
(``hifi_code_idefics/src/config/encoder/hifi.yaml``)."""
DEFAULT_RANK = 8
"""Rank of A B: ``lora_rank: 8`` of the same recipe (the class's own default is 4). With n = 8 and
r = 8 an Idefics-9B student has the 2.2M parameters the paper reports; r = 4 would give 1.1M."""


class HificlHeads(nn.Module):
    """The HiFICL parameters of one attention layer and the output they give.

    Parameters (H query heads of size D, n virtual tokens, rank r): ``key_a`` (H, n, r), ``key_b``
    (H, r, D), ``value_a`` (H, n, r), ``value_b`` (H, r, D): 2 H r (n + D) in all (``parameter_count``).
    Virtual tokens belong to query heads (GQA models share real key heads, not virtual ones).
    ``kernels`` (a plain attribute, not state) picks the log Z2 backend as for MimIC: the flex kernel
    on CUDA for long sequences, else the exact chunked logsumexp; a student's layers share one.
    """

    def __init__(self, num_heads: int, head_dim: int, tokens: int = DEFAULT_TOKENS, rank: int = DEFAULT_RANK,
                 kernels: MuKernels | None = None):
        super().__init__()
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("tokens", tokens), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HiFICL {name} must be a positive integer, got {value!r}")
        self.num_heads, self.head_dim, self.tokens, self.rank = num_heads, head_dim, tokens, rank
        self.kernels = kernels if kernels is not None else MuKernels()
        self.key_a = nn.Parameter(torch.randn(num_heads, tokens, rank))
        self.key_b = nn.Parameter(torch.randn(num_heads, rank, head_dim) * 0.01)
        self.value_a = nn.Parameter(torch.randn(num_heads, tokens, rank))
        self.value_b = nn.Parameter(torch.zeros(num_heads, rank, head_dim))

    def virtual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The virtual keys and values, (H, n, D) each in float32."""
        return (torch.matmul(self.key_a.float(), self.key_b.float()),
                torch.matmul(self.value_a.float(), self.value_b.float()))

    def _check(self, query: torch.Tensor) -> None:
        if query.shape[1] != self.num_heads or query.shape[-1] != self.head_dim:
            raise ValueError(f"HiFICL heads built for {self.num_heads} heads of size {self.head_dim}, "
                             f"got a query of shape {tuple(query.shape)}")

    def add_shift(self, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, is_causal: bool = True) -> torch.Tensor:
        """Attention over [virtual keys; real keys] from the real attention's output ``out``.

        out (B, Tq, H, D): SA(q, K, V) as sdpa computed it; query (B, H, Tq, D) post-RoPE; key
        (B, Hkv, Tkv, D); attention_mask / is_causal as ``masked_log_z2`` reads them (the keys sdpa
        attended to). Returns (B, Tq, H, D) in ``out``'s dtype, computed in float32.
        """
        self._check(query)
        path = self.kernels.choose(query, key, attention_mask, "mimic")  # the log Z2 choice MimIC makes
        log_z2, valid = masked_log_z2(query, key, attention_mask, scaling, is_causal=is_causal,
                                      backend="flex" if path == "flex" else "chunked", kernels=self.kernels)
        keys, values = self.virtual()
        scores = torch.matmul(query.float(), keys.transpose(-1, -2)[None]) * scaling  # (B, H, Tq, n)
        log_den = torch.logaddexp(torch.logsumexp(scores, dim=-1), log_z2)  # log(Z1 + Z2)
        # no visible real key: keep sdpa's row (MimIC's rule); log_z2 is a finite stand-in there
        keep = torch.where(valid, torch.exp(log_z2 - log_den), torch.ones_like(log_den))  # Z2 / (Z1 + Z2)
        weights = torch.exp(scores - log_den[..., None]) * valid[..., None]  # exp(q.k_v s) / (Z1 + Z2)
        virtual_out = torch.matmul(weights, values[None])  # (B, H, Tq, D)
        shifted = out.float() * keep.transpose(1, 2)[..., None] + virtual_out.transpose(1, 2)
        return shifted.to(out.dtype)


def parameter_count(num_layers: int, num_heads: int, head_dim: int, tokens: int = DEFAULT_TOKENS,
                    rank: int = DEFAULT_RANK) -> int:
    """Trainable HiFICL parameters of a model, without building it: L H 2 r (n + D)."""
    return num_layers * num_heads * 2 * rank * (tokens + head_dim)
