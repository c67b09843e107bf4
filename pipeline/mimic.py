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
the whole sequence. Three implementations compute mu, each chosen by the student's ``MuKernels`` (explicit
fields, no process-wide flags):

- ``reference``: ``MimicHeads.mu`` over ``masked_log_z2``, exact chunked logsumexp; every device, every
  mask, memory O(chunk x Tkv) per head.
- ``one_pass``: ``short_mu``, the same quantity from the full score matrix in as few tensor operations
  as possible (short sequences; with ``MuKernels.fused`` one compiled function on CUDA).
- ``flex``: ``pipeline.mimic_cuda.flex_log_z2``, a compiled flex_attention kernel (CUDA, long sequences).

Rows with no visible key get mu = 0.

log Z2 runs over exactly the keys the stock sdpa attention (``sdpa_attention_forward``) lets the
query see, so that f(q) - log Z2 is compared with the same normaliser the head's output used; with
no mask that is ``implicit_mask`` (sdpa's top-left causal rule), which also holds for a static KV
cache whose empty slots follow the prompt.

No transformers, no files: this module only knows tensors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.settings import VARIANTS  # the variants' names only: no transformers, no files

DEFAULT_CHUNK = 256
"""Queries per chunk of the reference log Z2, and the longest query length the one-pass path takes."""
LOG_Z2_BACKENDS = ("chunked", "flex")
"""chunked: exact chunked logsumexp (any device). flex: the compiled flex_attention kernel (CUDA only)."""
MU_PATHS = ("auto", "reference", "one_pass", "flex")
"""How ``MuKernels`` computes mu: ``auto`` picks per call (``MuKernels.choose``); the others force one."""
FLEX_MIN_SCORES = 256 * 256
"""``auto`` uses the flex kernel from this many (query, key) pairs per head on (log Z2 forward+backward
at T=256: 0.77x the chunked time, at T=512: 0.21x); below it the chunked path is as fast per layer
once the padding and block-mask ops are counted (docs/benchmarks.md)."""
FLEX_MAX_SHAPES = 6
"""``auto`` compiles the flex kernel for at most this many padded shapes, then uses the reference for
new ones (torch.compile's recompile limit is 8; past it flex would run eagerly on the whole matrix)."""


@dataclass(eq=False)
class MuKernels:
    """Which implementation computes mu, as explicit fields, and the caches those need. One object per
    student, shared by its layers (a forward's layers reuse one flex block mask); nothing per process.

    path: ``auto`` (``choose``), or force ``reference`` / ``one_pass`` / ``flex`` (tests hold each
    equal to the reference). fused: run the one-pass shift on CUDA as one compiled function. Off by
    default: on the benchmark GPU the compiled call costs as much host time as the eager ops it
    replaces (student forward +27% vs +19% eager; docs/benchmarks.md) and compiles ~1 min per graph;
    a compiler failure turns it off for this object, with a warning.
    flex_min_scores / flex_max_shapes: ``auto``'s flex thresholds (``FLEX_MIN_SCORES``, ``FLEX_MAX_SHAPES``).
    """

    path: str = "auto"
    fused: bool = False
    flex_min_scores: int = FLEX_MIN_SCORES
    flex_max_shapes: int = FLEX_MAX_SHAPES
    compiled: dict = field(default_factory=dict, repr=False)  # name -> compiled function
    flex_shapes: set = field(default_factory=set, repr=False)  # padded shapes flex was compiled for
    block_mask: list = field(default_factory=list, repr=False)  # [(key, mask, BlockMask)] of the last call

    def __post_init__(self) -> None:
        if self.path not in MU_PATHS:
            raise ValueError(f"unknown mu path {self.path!r}; choose one of {', '.join(MU_PATHS)}")

    def choose(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, variant: str) -> str:
        """The path for this call; a pure function of the arguments and this object (no side effect).

        auto: ``flex`` on CUDA for a bool or no mask, at least ``flex_min_scores`` pairs per head and a
        padded shape already compiled or within ``flex_max_shapes``; else ``one_pass`` up to
        ``DEFAULT_CHUNK`` queries with a bool or no mask; else ``reference``. The variants without log Z2
        (``shift_only``, ``query_independent``) always take ``reference``.
        """
        if variant not in ("mimic", "head_shared"):
            return "reference"
        plain_mask = mask is None or mask.dtype == torch.bool
        if self.path != "auto":
            if self.path != "reference" and not plain_mask:
                raise ValueError(f"the {self.path} mu path takes a bool mask or none, got {mask.dtype}; "
                                 "use path='reference' (or 'auto')")
            if self.path == "flex" and not query.is_cuda:
                raise ValueError("the flex mu path needs CUDA tensors; use path='auto' or 'reference' on CPU")
            return self.path
        if not plain_mask:
            return "reference"
        if query.is_cuda and query.shape[2] * key.shape[2] >= self.flex_min_scores:
            from pipeline import mimic_cuda

            if (mimic_cuda.flex_shape(query, key, mask) in self.flex_shapes
                    or len(self.flex_shapes) < self.flex_max_shapes):
                return "flex"
        return "one_pass" if query.shape[2] <= DEFAULT_CHUNK else "reference"


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
    backend: str = "chunked",
    is_causal: bool = True,
    kernels: MuKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z2(q) = logsumexp_j (q . k_j * scaling) over the keys q may attend to.

    query: (B, H, Tq, D) post-RoPE; key: (B, Hkv, Tkv, D), H a multiple of Hkv (GQA: query head h
    uses key head h // (H / Hkv), as ``repeat_kv`` does). attention_mask: bool (B, 1|H, Tq, Tkv),
    True = attend; or an additive float mask; or None = the keys sdpa attends to without a mask
    (``implicit_mask``: query i sees keys 0..i when Tq > 1 and ``is_causal``, else every key).
    Returns (log_z2 (B, H, Tq) float32, valid (B, H, Tq) bool: the row sees at least one key).
    Differentiable in query and key; chunks of ``chunk_size`` queries are recomputed in backward
    (checkpointed) when gradients are needed, so memory is O(chunk * Tkv) per head. ``backend``: see
    ``LOG_Z2_BACKENDS``; ``kernels`` holds the flex kernel's compiled function and block-mask cache
    (default: a fresh ``MuKernels``).
    """
    if backend not in LOG_Z2_BACKENDS:
        raise ValueError(f"unknown log Z2 backend {backend!r}; choose one of {', '.join(LOG_Z2_BACKENDS)}")
    if backend == "flex":
        if not query.is_cuda:
            raise ValueError("the flex log Z2 backend needs CUDA tensors; use backend='chunked' on CPU")
        from pipeline import mimic_cuda

        return mimic_cuda.flex_log_z2(query, key, attention_mask, scaling, is_causal,
                                      kernels if kernels is not None else MuKernels())
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
    unchanged; f starts as ``nn.Linear(D, 1)`` does. ``kernels`` (a plain attribute, not state) picks
    how mu is computed; a student's layers share one (``pipeline.methods.mimic.build``).
    """

    def __init__(self, num_heads: int, head_dim: int, variant: str = "mimic", kernels: MuKernels | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MimIC variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernels = kernels if kernels is not None else MuKernels()
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

    def mu(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
           chunk_size: int = DEFAULT_CHUNK, is_causal: bool = True, backend: str = "chunked") -> torch.Tensor:
        """mu(q) = sigmoid(f(q) - log Z2(q)), zero on rows with no visible key: the reference
        implementation (``backend`` chunked) or with the flex log Z2 (CUDA). Returns (B, H, Tq) float32."""
        bsz, n_heads, q_len, _ = query.shape
        if self.variant == "shift_only":
            return query.new_ones(bsz, n_heads, q_len, dtype=torch.float32)
        if self.variant == "query_independent":
            return torch.sigmoid(self.gate.float())[None, :, None].expand(bsz, n_heads, q_len)
        log_z2, valid = masked_log_z2(query, key, attention_mask, scaling, chunk_size, is_causal=is_causal,
                                      backend=backend, kernels=self.kernels)
        return torch.sigmoid(self.log_z1(query) - log_z2) * valid

    def _check(self, query: torch.Tensor) -> None:
        if query.shape[1] != self.num_heads or query.shape[-1] != self.head_dim:
            raise ValueError(
                f"MimIC heads built for {self.num_heads} heads of size {self.head_dim}, "
                f"got a query of shape {tuple(query.shape)}"
            )

    def _f(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.f_weight, self.f_bias

    def _shift(self, path: str, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float, is_causal: bool) -> torch.Tensor:
        if path == "one_pass":
            args = (query, key, attention_mask, scaling, *self._f(), self.shift, is_causal)
            if self.kernels.fused and query.is_cuda:
                out = _fused_one_pass(self.kernels, *args)
                if out is not None:
                    return out
            return one_pass_shift(*args)
        mu = self.mu(query, key, attention_mask, scaling, is_causal=is_causal,
                     backend="flex" if path == "flex" else "chunked")
        return (mu[..., None] * self.shift.float()[None, :, None, :]).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                is_causal: bool = True) -> torch.Tensor:
        """The term mu(q) v added to the head outputs, by the path ``self.kernels`` chooses. Returns
        (B, Tq, H, D) in float32. ``is_causal``: the module's causality, as ``sdpa_attention_forward``
        reads it (matters only without a mask)."""
        self._check(query)
        path = self.kernels.choose(query, key, attention_mask, self.variant)
        return self._shift(path, query, key, attention_mask, scaling, is_causal)

    def add_shift(self, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, is_causal: bool = True) -> torch.Tensor:
        """``out + mu(q) v`` for head outputs ``out`` (B, Tq, H, D), in ``out``'s dtype. The eager
        one-pass path adds in one ``addcmul`` (these small calls are bound by the number of ops)."""
        self._check(query)
        path = self.kernels.choose(query, key, attention_mask, self.variant)
        if path == "one_pass" and not (self.kernels.fused and query.is_cuda):
            mu = short_mu(query, key, attention_mask, scaling, *self._f(), is_causal)
            return torch.addcmul(out.float(), mu.transpose(1, 2)[..., None], self.shift.float()).to(out.dtype)
        return (out.float() + self._shift(path, query, key, attention_mask, scaling, is_causal)).to(out.dtype)


def one_pass_shift(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                   f_weight: torch.Tensor, f_bias: torch.Tensor, shift: torch.Tensor,
                   is_causal: bool = True) -> torch.Tensor:
    """mu(q) v of every head by ``short_mu``: (B, Tq, H, D) float32 (what ``MuKernels.fused`` compiles)."""
    mu = short_mu(query, key, mask, scaling, f_weight, f_bias, is_causal)
    return (mu[..., None] * shift.float()[None, :, None, :]).transpose(1, 2)


def _fused_one_pass(kernels: MuKernels, *args) -> torch.Tensor | None:
    """``one_pass_shift`` compiled once per ``kernels`` with dynamic shapes (batch and lengths vary); None
    after a compiler failure, which also turns ``kernels.fused`` off (with a warning): use the eager ops."""
    if "one_pass_shift" not in kernels.compiled:
        kernels.compiled["one_pass_shift"] = torch.compile(one_pass_shift, dynamic=True)
    try:
        return kernels.compiled["one_pass_shift"](*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # a compiler failure must not stop a run: the eager ops compute the same
        kernels.fused = False
        warnings.warn(f"compiling the fused MimIC shift failed ({type(err).__name__}: {err}); using eager ops",
                      stacklevel=2)
        return None


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
