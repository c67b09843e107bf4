"""The MimIC method, pure torch (Jiang et al., CVPR 2025, arXiv 2504.08851, Sec. 3).

For one query q of a head with keys K and values V, attention over demonstrations' keys K_D
prepended to K decomposes exactly (Eq. 4 of the paper):

    SA(q, [K_D; K], [V_D; V]) = (1 - mu) SA(q, K, V) + mu SA(q, K_D, V_D),   mu = Z1 / (Z1 + Z2)

with Z1 = sum_j exp(q.k_j^D * s) and Z2 = sum_j exp(q.k_j * s). MimIC keeps the first term as is and
learns the second: a shift vector v per head stands for SA(q, K_D, V_D) - SA(q, K, V), and
f(q) = <w, q> + b approximates log Z1, so that

    out(q) = SA(q, K, V) + mu(q) v,        mu(q) = sigmoid(f(q) - log Z2(q))        (Eq. 6-7)

log Z2 is the masked log-normaliser of the head's *own* attention (causal, padding and sliding
window masks applied, GQA key heads shared), computed exactly without holding the (T x T) matrix of
the whole sequence: here in chunks of queries (every device); on CUDA ``pipeline.mimic_cuda`` uses a
compiled flex_attention kernel for long sequences (and, if enabled, one compiled function for the
whole shift of short ones). Rows with no visible key get mu = 0.

log Z2 runs over exactly the keys the stock sdpa attention (``sdpa_attention_forward``) lets the
query see, so that f(q) - log Z2 is compared with the same normaliser the head's output used; with
no mask that is ``implicit_mask`` (sdpa's top-left causal rule), which also holds for a static KV
cache whose empty slots follow the prompt.

No transformers, no files: this module only knows tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.settings import VARIANTS  # the variants' names only: no transformers, no files

DEFAULT_CHUNK = 256
LOG_Z2_BACKENDS = ("auto", "chunked", "flex")
"""auto: the flex kernel on CUDA for long sequences (``pipeline.mimic_cuda.use_flex``), else chunked.
chunked: exact chunked logsumexp (any device). flex: the compiled flex_attention kernel (CUDA only)."""


def implicit_mask(q_len: int, kv_len: int, device: torch.device, is_causal: bool = True) -> torch.Tensor | None:
    """The keys ``sdpa_attention_forward`` lets each query see when it is given no mask: None for every
    key (one query, or a non-causal module), else bool (1, 1, Tq, Tkv), True = attend, query i seeing
    keys 0..i.

    Top-left, not bottom-right: transformers passes no mask with Tq > 1 only when Tkv == Tq or on a
    static-cache prefill (Tkv = the cache size, the slots past Tq empty); sdpa then keeps the first Tq
    keys under torch's top-left ``is_causal``. A bottom-right rule would count empty and future slots.
    Shared by ``pipeline.mimic_cuda`` so every backend selects the same keys.
    """
    if q_len == 1 or not is_causal:
        return None
    return (torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None])[None, None]


def _chunk_lse(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over keys for one chunk of queries.

    q: (B, Hkv, G, t, D) float32; k: (B, Hkv, 1, Tkv, D) float32; mask: bool (B, 1|Hkv, 1|G, t, Tkv)
    or float additive of the same shape, or None. Returns lse (B, Hkv, G, t) and valid (same shape).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is None:
        valid = torch.ones(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
        valid = mask.any(-1).expand(scores.shape[:-1])
    else:
        scores = scores + mask.float()
        visible = mask > torch.finfo(mask.dtype).min / 2
        valid = visible.any(-1).expand(scores.shape[:-1])
    lse = torch.logsumexp(scores, dim=-1)
    # A fully masked row has lse = -inf; any finite stand-in works because mu is zeroed there.
    return torch.where(valid, lse, torch.zeros_like(lse)), valid


def _grouped(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float32 query (B, Hkv, G, Tq, D) grouped by key head (GQA without repeating K), key
    (B, Hkv, 1, Tkv, D), and the bool/float mask broadcast to (B, 1|Hkv, 1|G, Tq, Tkv): the given mask
    sliced to Tkv, or for None ``implicit_mask`` (None = every key)."""
    bsz, n_heads, q_len, dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key heads ({n_kv})")
    groups = n_heads // n_kv
    q = query.reshape(bsz, n_kv, groups, q_len, dim).float()
    k = key.float()[:, :, None]
    if attention_mask is None:
        implicit = implicit_mask(q_len, kv_len, query.device, is_causal)
        mask = None if implicit is None else implicit[:, :, None]
    else:
        m = attention_mask[..., :kv_len]
        mask = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], n_kv, groups, m.shape[2], kv_len)
    return q, k, mask


def masked_log_z2(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    chunk_size: int = DEFAULT_CHUNK,
    use_checkpoint: bool | None = None,
    backend: str = "auto",
    is_causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z2(q) = logsumexp_j (q . k_j * scaling) over the keys q may attend to.

    query: (B, H, Tq, D) post-RoPE; key: (B, Hkv, Tkv, D), H a multiple of Hkv (GQA: query head h
    uses key head h // (H / Hkv), as ``repeat_kv`` does). attention_mask: bool (B, 1|H, Tq, Tkv),
    True = attend; or an additive float mask; or None = the keys sdpa attends to without a mask
    (``implicit_mask``: query i sees keys 0..i when Tq > 1 and ``is_causal``, else every key).
    Returns (log_z2 (B, H, Tq) float32, valid (B, H, Tq) bool: the row sees at least one key).
    Differentiable in query and key; chunks of ``chunk_size`` queries are recomputed in backward
    (checkpointed) when gradients are needed, so memory is O(chunk * Tkv) per head. ``backend``: see
    ``LOG_Z2_BACKENDS`` (the flex kernel on CUDA for long sequences, chunked otherwise).
    """
    if backend not in LOG_Z2_BACKENDS:
        raise ValueError(f"unknown log Z2 backend {backend!r}; choose one of {', '.join(LOG_Z2_BACKENDS)}")
    if backend == "flex" and not query.is_cuda:
        raise ValueError("the flex log Z2 backend needs CUDA tensors; use backend='chunked' (or 'auto') on CPU")
    if backend != "chunked" and query.is_cuda:
        from pipeline import mimic_cuda

        if backend == "flex" or mimic_cuda.use_flex(query, key, attention_mask):
            return mimic_cuda.flex_log_z2(query, key, attention_mask, scaling, is_causal)
    bsz, n_heads, q_len, _ = query.shape
    q, k, mask = _grouped(query, key, attention_mask, is_causal)
    if use_checkpoint is None:
        use_checkpoint = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    lses, valids = [], []
    for start in range(0, q_len, chunk_size):
        stop = min(start + chunk_size, q_len)
        q_c = q[:, :, :, start:stop]
        m_c = None if mask is None else mask[..., start:stop, :] if mask.shape[-2] > 1 else mask
        if use_checkpoint and q_len > chunk_size:
            lse, valid = checkpoint(_chunk_lse, q_c, k, m_c, scaling, use_reentrant=False)
        else:
            lse, valid = _chunk_lse(q_c, k, m_c, scaling)
        lses.append(lse)
        valids.append(valid)
    lse = torch.cat(lses, dim=-1).reshape(bsz, n_heads, q_len)
    valid = torch.cat(valids, dim=-1).reshape(bsz, n_heads, q_len)
    return lse, valid


class MimicHeads(nn.Module):
    """The MimIC parameters of one attention layer and the shift they add (Eq. 6-7).

    Parameters (H heads of size D): ``shift`` v (H, D); for ``mimic`` ``f_weight`` (H, D) and
    ``f_bias`` (H,) — H(2D + 1) in all; ``head_shared`` (D,) and (1,); ``query_independent`` a
    ``gate`` (H,); ``shift_only`` nothing else. v starts at zero, so a fresh module leaves the model
    unchanged; f starts as ``nn.Linear(D, 1)`` does.
    """

    def __init__(self, num_heads: int, head_dim: int, variant: str = "mimic"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MimIC variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.shift = nn.Parameter(torch.zeros(num_heads, head_dim))
        bound = 1.0 / math.sqrt(head_dim)
        if variant == "mimic":
            self.f_weight = nn.Parameter(torch.empty(num_heads, head_dim).uniform_(-bound, bound))
            self.f_bias = nn.Parameter(torch.empty(num_heads).uniform_(-bound, bound))
        elif variant == "head_shared":
            self.f_weight = nn.Parameter(torch.empty(head_dim).uniform_(-bound, bound))
            self.f_bias = nn.Parameter(torch.empty(1).uniform_(-bound, bound))
        elif variant == "query_independent":
            self.gate = nn.Parameter(torch.zeros(num_heads))

    def log_z1(self, query: torch.Tensor) -> torch.Tensor:
        """f(q) = <w_h, q> + b_h, the learned stand-in for log Z1. query (B, H, T, D) -> (B, H, T)."""
        q = query.float()
        if self.variant == "mimic":
            return torch.einsum("bhtd,hd->bht", q, self.f_weight.float()) + self.f_bias.float()[None, :, None]
        return torch.einsum("bhtd,d->bht", q, self.f_weight.float()) + self.f_bias.float()

    def mu(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        chunk_size: int = DEFAULT_CHUNK,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """mu(q) = sigmoid(f(q) - log Z2(q)), zero on rows with no visible key. Returns (B, H, Tq) float32."""
        bsz, n_heads, q_len, _ = query.shape
        if self.variant == "shift_only":
            return query.new_ones(bsz, n_heads, q_len, dtype=torch.float32)
        if self.variant == "query_independent":
            return torch.sigmoid(self.gate.float())[None, :, None].expand(bsz, n_heads, q_len)
        log_z2, valid = masked_log_z2(query, key, attention_mask, scaling, chunk_size, is_causal=is_causal)
        return torch.sigmoid(self.log_z1(query) - log_z2) * valid

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """The term mu(q) v added to the head outputs. Returns (B, Tq, H, D) in float32. ``is_causal``:
        the module's causality, as ``sdpa_attention_forward`` reads it (matters only without a mask)."""
        if query.shape[1] != self.num_heads or query.shape[-1] != self.head_dim:
            raise ValueError(
                f"MimIC heads built for {self.num_heads} heads of size {self.head_dim}, "
                f"got a query of shape {tuple(query.shape)}"
            )
        if query.is_cuda and self.variant in ("mimic", "head_shared"):
            from pipeline import mimic_cuda

            mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
            if mimic_cuda.use_fused(query, key, mask):
                weight, bias = self.f_weight, self.f_bias
                if self.variant == "head_shared":
                    weight, bias = weight.expand(self.num_heads, -1), bias.expand(self.num_heads)
                out = mimic_cuda.fused_shift(query, key, mask, weight, bias, self.shift, scaling, is_causal)
                if out is not None:
                    return out
        mu = self.mu(query, key, attention_mask, scaling, is_causal=is_causal)
        return (mu[..., None] * self.shift.float()[None, :, None, :]).transpose(1, 2)

    def add_shift(
        self,
        out: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """``out + mu(q) v`` for head outputs ``out`` (B, Tq, H, D), in ``out``'s dtype.

        Short sequences of the ``mimic``/``head_shared`` variants with a bool or no mask (decoding,
        student-length prompts) take ``short_mu``: the same values as ``forward`` in about half the
        tensor operations, which is what bounds these small calls on a GPU. Everything else goes
        through ``forward``.
        """
        if (
            self.variant in ("mimic", "head_shared")
            and query.shape[2] <= DEFAULT_CHUNK
            and (attention_mask is None or attention_mask.dtype == torch.bool)
            and not (query.is_cuda and _cuda_prefers_other(query, key, attention_mask))
        ):
            if query.shape[1] != self.num_heads or query.shape[-1] != self.head_dim:
                return self.forward(query, key, attention_mask, scaling, is_causal)  # raises the shape error
            mu = short_mu(query, key, attention_mask, scaling, self.f_weight, self.f_bias, is_causal)
            return torch.addcmul(out.float(), mu.transpose(1, 2)[..., None], self.shift.float()).to(out.dtype)
        return (out.float() + self.forward(query, key, attention_mask, scaling, is_causal)).to(out.dtype)


def _cuda_prefers_other(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """On CUDA the flex kernel (long sequences) or the fused compiled shift, when enabled, win."""
    from pipeline import mimic_cuda

    mask = None if mask is None else mask[..., : key.shape[2]]
    return mimic_cuda.use_flex(query, key, mask) or mimic_cuda.use_fused(query, key, mask)


def short_mu(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    f_weight: torch.Tensor,
    f_bias: torch.Tensor,
    is_causal: bool = True,
) -> torch.Tensor:
    """mu(q) = sigmoid(f(q) - log Z2(q)) in one pass over all (query, key) pairs, in float32.

    The same quantity as ``MimicHeads.mu`` (``masked_log_z2`` without chunks) written with as few
    tensor operations as possible. query (B, H, Tq, D); key (B, Hkv, Tkv, D); mask bool
    (B, 1|H, Tq, >=Tkv) or None (``implicit_mask``); f_weight (H, D) or (D,) shared, f_bias (H,) or
    (1,). Returns (B, H, Tq); rows with no visible key are 0 (and pass no NaN gradient).
    """
    bsz, n_heads, q_len, dim = query.shape
    q, k, mask = _grouped(query, key, attention_mask, is_causal)
    n_kv, groups = q.shape[1], q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, Hkv, G, Tq, Tkv)
    weight = f_weight.float().expand(n_heads, dim).reshape(n_kv, groups, dim, 1)
    log_z1 = torch.matmul(q, weight)[..., 0] + f_bias.float().expand(n_heads).reshape(n_kv, groups, 1)
    if mask is None:
        log_z2 = torch.logsumexp(scores * scaling, dim=-1)
        mu = torch.sigmoid(log_z1 - log_z2)
    else:
        hidden = ~mask
        log_z2 = torch.logsumexp(scores.mul_(scaling).masked_fill_(hidden, float("-inf")), dim=-1)
        empty = hidden.all(-1)  # broadcasts over heads like the mask
        mu = torch.sigmoid(log_z1 - log_z2.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
    return mu.reshape(bsz, n_heads, q_len)


def parameter_count(num_layers: int, num_heads: int, head_dim: int, variant: str = "mimic") -> int:
    """Trainable MimIC parameters of a model, without building it."""
    per_layer = {
        "mimic": num_heads * (2 * head_dim + 1),
        "head_shared": num_heads * head_dim + head_dim + 1,
        "query_independent": num_heads * (head_dim + 1),
        "shift_only": num_heads * head_dim,
    }
    if variant not in per_layer:
        raise ValueError(f"unknown MimIC variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    return num_layers * per_layer[variant]
