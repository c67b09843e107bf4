"""The MimIC math on CUDA: log Z2 by a compiled flex_attention kernel for long sequences and,
optionally, the whole shift mu(q) v as one compiled function for short ones (pure torch, as
``pipeline.mimic``).

Measured on an H100 (docs/benchmarks.md, bench/log_z2.py, bench/attention.py):
- log Z2 at B4/H32/KV8/T2048/D128: flex 0.40 ms forward, 1.7 ms forward+backward, against 15.5 and
  48.6 ms for the chunked path; about equal at T ~ 80. The flex lse output carries gradients in q
  and k (verified on torch 2.11 against a float64 reference: fp32, bf16, padding, GQA, KV cache).
- Short sequences (the student's ~80 tokens) are bound by the host cost of ~30 small eager ops per
  layer, not by arithmetic; ``FUSED_SHIFT`` runs them as one compiled function (off: no faster there).

Both are used only on CUDA; ``pipeline.mimic`` keeps the exact chunked path for every device.
"""

from __future__ import annotations

import warnings

import torch

from pipeline.mimic import implicit_mask

FLEX_MIN_SCORES = 256 * 256
"""``auto`` uses the flex kernel from this many (query, key) pairs per head on (log Z2 forward+backward
at T=256: 0.77x the chunked time, at T=512: 0.21x); below it the chunked path is as fast per layer
once the padding and block-mask ops are counted (docs/benchmarks.md)."""
FLEX_BLOCK = 128
"""Sequence lengths are padded to a multiple of this for the flex kernel, so a new length costs a new
compilation only every 128 tokens."""
FLEX_MAX_SHAPES = 6
"""``auto`` compiles the kernel for at most this many padded shapes, then uses the chunked path for
new ones (torch.compile's recompile limit is 8; past it flex would run eagerly on the whole matrix)."""
FUSED_SHIFT = False
"""Compute mu(q) v of short sequences with one compiled function. Off: on the benchmark H100 VM the
compiled call costs as much host time as the eager ops it replaces (student forward +27% vs +19%
eager, forward+backward +51% both; docs/benchmarks.md), and it compiles for ~1 min per new graph."""
_COMPILED: dict[str, object] = {}
_FLEX_SHAPES: set = set()
_LAST_BLOCK_MASK: list = []  # [(key, mask tensor or None, BlockMask)]: every layer of a forward shares one mask


def _compiled_flex():
    """flex_attention compiled once per process (eager flex materialises the whole score matrix)."""
    if "flex" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _lse_request() -> dict:
    """Ask flex_attention for (out, lse): ``return_aux`` where it exists, else the older ``return_lse``."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def _pad_to(x: torch.Tensor, dim: int, size: int, value: float | bool = 0) -> torch.Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return torch.nn.functional.pad(x, pad, value=value)


def _visible_keys(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device,
                  is_causal: bool = True) -> torch.Tensor:
    """bool (B|1, 1|H, Tq, Tkv): the mask, or for None the CPU path's rule (``pipeline.mimic.implicit_mask``)
    made dense, since the kernels below need a tensor even where every key is visible."""
    if mask is not None:
        return mask
    implicit = implicit_mask(q_len, kv_len, device, is_causal)
    # full Tq rows: the flex block mask pads this along Tq, which a broadcast row would not survive
    return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device) if implicit is None else implicit


def _flex_block_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, q_pad: int, kv_pad: int,
                     device: torch.device, is_causal: bool = True):
    """A flex BlockMask for a bool mask (B|1, 1|H, Tq, Tkv) True = attend (None: ``_visible_keys``), padded
    with False to (q_pad, kv_pad). Built from the dense mask by block reductions (a few kernels)
    rather than ``create_block_mask``, which evaluates the mask function over the whole grid
    eagerly (~8 ms per call on an H100)."""
    from torch.nn.attention.flex_attention import BlockMask

    visible = _visible_keys(mask, q_len, kv_len, device, is_causal)
    dense = _pad_to(_pad_to(visible, 3, kv_pad, False), 2, q_pad, False).contiguous()
    per_batch, per_head = dense.shape[0] > 1, dense.shape[1] > 1

    def dense_mod(b, h, q, kv):
        return dense[b if per_batch else 0, h if per_head else 0, q, kv]

    n_q, n_kv = q_pad // FLEX_BLOCK, kv_pad // FLEX_BLOCK
    blocks = dense.view(*dense.shape[:2], n_q, FLEX_BLOCK, n_kv, FLEX_BLOCK)
    full = blocks.all(dim=5).all(dim=3)
    partial = blocks.any(dim=5).any(dim=3) & ~full

    def sparse(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        return counts, order.to(torch.int32)

    return BlockMask.from_kv_blocks(*sparse(partial), *sparse(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=dense_mod,
                                    seq_lengths=(q_pad, kv_pad))


def flex_log_z2(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
    is_causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_log_z2`` by one compiled flex_attention call (CUDA); same arguments and returns.

    The kernel's logsumexp output is differentiable in query and key (its backward folds d lse into
    the softmax gradient). The key doubles as the value tensor (the attention output is discarded).
    Only bool masks or None. Lengths are padded to multiples of ``FLEX_BLOCK`` (padded keys masked).
    """
    bsz, n_heads, q_len, _ = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key heads ({n_kv})")
    mask = None if attention_mask is None else attention_mask[..., :kv_len]
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"flex_log_z2 takes a bool mask or None, got {mask.dtype}; use the chunked path")
    q_pad = -(-q_len // FLEX_BLOCK) * FLEX_BLOCK
    kv_pad = -(-kv_len // FLEX_BLOCK) * FLEX_BLOCK
    cache_key = (bsz, q_len, kv_len, query.device, is_causal, None if mask is None else tuple(mask.shape))
    if _LAST_BLOCK_MASK and _LAST_BLOCK_MASK[0][0] == cache_key and _LAST_BLOCK_MASK[0][1] is attention_mask:
        block_mask = _LAST_BLOCK_MASK[0][2]
    else:
        block_mask = _flex_block_mask(mask, q_len, kv_len, q_pad, kv_pad, query.device, is_causal)
        _LAST_BLOCK_MASK[:] = [(cache_key, attention_mask, block_mask)]
    k = _pad_to(key, 2, kv_pad)
    q = _pad_to(query.to(k.dtype), 2, q_pad)
    _, aux = _compiled_flex()(q, k, k, block_mask=block_mask, scale=scaling, enable_gqa=n_heads != n_kv,
                              **_lse_request())
    lse = getattr(aux, "lse", aux)[:, :, :q_len].float()
    if mask is None:
        valid = torch.ones(bsz, n_heads, q_len, dtype=torch.bool, device=query.device)
    else:
        valid = mask.any(-1).expand(bsz, n_heads, q_len)
    # fully masked rows: the kernel's value there is meaningless (0 or -inf); mu is zeroed by valid
    return torch.where(valid, lse, torch.zeros_like(lse)), valid


def use_flex(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """The ``auto`` choice: CUDA, a bool mask or None, at least ``FLEX_MIN_SCORES`` pairs per head, and
    a padded shape among the first ``FLEX_MAX_SHAPES`` seen (or already compiled)."""
    if not (query.is_cuda and (mask is None or mask.dtype == torch.bool)
            and query.shape[2] * key.shape[2] >= FLEX_MIN_SCORES):
        return False
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    shape = (*query.shape[:2], -(-query.shape[2] // FLEX_BLOCK), -(-key.shape[2] // FLEX_BLOCK), key.shape[1],
             query.dtype, grad, None if mask is None else tuple(mask.shape[:2]))
    if shape not in _FLEX_SHAPES and len(_FLEX_SHAPES) >= FLEX_MAX_SHAPES:
        return False
    _FLEX_SHAPES.add(shape)
    return True


def dense_shift(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, f_weight: torch.Tensor,
                f_bias: torch.Tensor, shift: torch.Tensor, scaling: float, is_causal: bool = True) -> torch.Tensor:
    """mu(q) v of every head at once from the full score matrix (short sequences; compiled on CUDA).

    query (B, H, Tq, D); key (B, Hkv, Tkv, D); mask bool (B|1, 1|H, Tq, Tkv) already cut to Tkv, or
    None (``_visible_keys``); f_weight (H, D), f_bias (H,), shift (H, D).
    mu = sigmoid(<w, q> + b - logsumexp_visible(q.k * scaling)), 0 on rows with no visible key (Eq. 6-7).
    Returns (B, Tq, H, D) float32.
    """
    bsz, n_heads, q_len, dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    q = query.float()
    scores = torch.matmul(q.reshape(bsz, n_kv, groups * q_len, dim), key.float().transpose(-1, -2)) * scaling
    scores = scores.reshape(bsz, n_kv, groups, q_len, kv_len)
    visible = _visible_keys(mask, q_len, kv_len, query.device, is_causal)
    visible = visible[:, :, None] if visible.shape[1] == 1 else visible.reshape(-1, n_kv, groups, q_len, kv_len)
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    valid = visible.any(-1).expand(bsz, n_kv, groups, q_len)
    lse = torch.where(valid, lse, torch.zeros_like(lse)).reshape(bsz, n_heads, q_len)
    f = torch.einsum("bhtd,hd->bht", q, f_weight.float()) + f_bias.float()[None, :, None]
    mu = torch.sigmoid(f - lse) * valid.reshape(bsz, n_heads, q_len)
    return (mu[..., None] * shift.float()[None, :, None, :]).transpose(1, 2)


def fused_shift(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, f_weight: torch.Tensor,
                f_bias: torch.Tensor, shift: torch.Tensor, scaling: float, is_causal: bool = True) -> torch.Tensor | None:
    """``dense_shift`` compiled once per process with dynamic shapes (batch and lengths vary); None
    (after a warning, and for the rest of the process) if the compiler fails: use the eager ops."""
    global FUSED_SHIFT
    if "dense_shift" not in _COMPILED:
        _COMPILED["dense_shift"] = torch.compile(dense_shift, dynamic=True)
    try:
        return _COMPILED["dense_shift"](query, key, mask, f_weight, f_bias, shift, scaling, is_causal)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # a compiler failure must not stop a run: the eager ops compute the same
        FUSED_SHIFT = False
        warnings.warn(f"compiling the fused MimIC shift failed ({type(err).__name__}: {err}); using eager ops",
                      stacklevel=2)
        return None


def use_fused(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """The fused short-sequence path: CUDA, a bool mask or None, and fewer pairs than flex takes."""
    return (FUSED_SHIFT and query.is_cuda and (mask is None or mask.dtype == torch.bool)
            and query.shape[2] * key.shape[2] < FLEX_MIN_SCORES)
