"""The MimIC math on CUDA: log Z2 by a compiled flex_attention kernel for long sequences (pure torch,
as ``pipeline.mimic``, which chooses when to call it: ``MuKernels.choose``).

Measured on an H100 (docs/benchmarks.md, bench/log_z2.py, bench/attention.py):
- log Z2 at B4/H32/KV8/T2048/D128: flex 0.40 ms forward, 1.7 ms forward+backward, against 15.5 and
  48.6 ms for the chunked path; about equal at T ~ 80. The flex lse output carries gradients in q
  and k (verified on torch 2.11 against a float64 reference: fp32, bf16, padding, GQA, KV cache).
- Short sequences (the student's ~80 tokens) are bound by the host cost of small eager ops, not by
  arithmetic: ``pipeline.mimic``'s one-pass path (optionally compiled, ``MuKernels.fused``) serves them.

The compiled kernel and the block-mask cache belong to the caller's ``MuKernels``: this module keeps
no state.
"""

from __future__ import annotations

import torch

from pipeline.mimic import MuKernels, implicit_mask

FLEX_BLOCK = 128
"""Sequence lengths are padded to a multiple of this for the flex kernel, so a new length costs a new
compilation only every 128 tokens."""


def compiled_flex(kernels: MuKernels):
    """flex_attention compiled once per ``kernels`` (eager flex materialises the whole score matrix)."""
    if "flex" not in kernels.compiled:
        from torch.nn.attention.flex_attention import flex_attention

        kernels.compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return kernels.compiled["flex"]


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


def flex_shape(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """What the compiled kernel specialises on: batch, heads, padded lengths, key heads, dtype, whether
    gradients flow, the mask's broadcast shape."""
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return (*query.shape[:2], -(-query.shape[2] // FLEX_BLOCK), -(-key.shape[2] // FLEX_BLOCK), key.shape[1],
            query.dtype, grad, None if mask is None else tuple(mask.shape[:2]))


def flex_log_z2(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
    is_causal: bool = True, kernels: MuKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_log_z2`` by one compiled flex_attention call (CUDA); same arguments and returns.
    ``kernels`` holds the compiled kernel, the shapes compiled (recorded here, where they are compiled)
    and the last block mask, which every layer of one forward shares (default: a fresh ``MuKernels``).

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
    kernels = kernels if kernels is not None else MuKernels()
    q_pad = -(-q_len // FLEX_BLOCK) * FLEX_BLOCK
    kv_pad = -(-kv_len // FLEX_BLOCK) * FLEX_BLOCK
    cache_key = (bsz, q_len, kv_len, query.device, is_causal, None if mask is None else tuple(mask.shape))
    last = kernels.block_mask
    if last and last[0][0] == cache_key and last[0][1] is attention_mask:
        block_mask = last[0][2]
    else:
        block_mask = _flex_block_mask(mask, q_len, kv_len, q_pad, kv_pad, query.device, is_causal)
        last[:] = [(cache_key, attention_mask, block_mask)]
    kernels.flex_shapes.add(flex_shape(query, key, mask))
    k = _pad_to(key, 2, kv_pad)
    q = _pad_to(query.to(k.dtype), 2, q_pad)
    _, aux = compiled_flex(kernels)(q, k, k, block_mask=block_mask, scale=scaling, enable_gqa=n_heads != n_kv,
                                    **_lse_request())
    lse = getattr(aux, "lse", aux)[:, :, :q_len].float()
    if mask is None:
        valid = torch.ones(bsz, n_heads, q_len, dtype=torch.bool, device=query.device)
    else:
        valid = mask.any(-1).expand(bsz, n_heads, q_len)
    # fully masked rows: the kernel's value there is meaningless (0 or -inf); mu is zeroed by valid
    return torch.where(valid, lse, torch.zeros_like(lse)), valid
