"""Training-free shift vectors at one position: the mechanics of Task Vector and Function Vector.

Task Vector (Hendel et al., EMNLP Findings 2023, "In-Context Learning Creates Task Vectors"): the
residual-stream state (the decoder layer's output) at layer L at the last prompt position, averaged
over k-shot ICL prompts; at inference the query runs alone and that state is *replaced* by the vector.

Function Vector (Todd et al., ICLR 2024, "Function Vectors in Large Language Models"): the mean
output of each attention head at the last prompt position over ICL prompts; each head's causal
indirect effect (CIE) is the gain in the probability of the correct answer's first token when its
mean output is patched into an ICL prompt whose demonstration answers are shuffled; the FV is the
sum of the top-k heads' mean outputs through their slice of ``o_proj``, *added* to the residual
stream at layer L at the last prompt position.

"The last prompt position" is the token right before the answer (the text tasks' ``->``): index
``answer_start - 1`` of a teacher-forced prompt, the last index of a generation prompt. A patch acts
at ``positions`` (one per row) when the caller sets them (right-padded forwards: fitting, the L2
analysis), else at the last position of every forward of more than one token — the prefill of a
left-padded ``generate``, whose last position is every prompt's last token; decode steps (one token)
pass untouched.

Head outputs are read and patched inside the attention function MimIC registers with transformers
(``pipeline.attention``: the per-head output before ``o_proj``), never by a copied forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.attention import attach_mimic
from pipeline.capture import StateCapture
from pipeline.families.base import decoder_layers
from pipeline.forward import keeps_logits, model_dtype, to_device
from pipeline.methods.base import ModuleAttachment, attach_output_hooks

MODES = ("replace", "add")


def prompt_ends(prompts: Sequence[Any]) -> list[int]:
    """The last prompt position of each prompt: before its teacher-forced answer, else its last token."""
    return [(p.answer_start if p.answer_start is not None else len(p.encoded)) - 1 for p in prompts]


def patch_positions(hidden: torch.Tensor, positions: torch.Tensor | None, vector: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """``hidden`` (B, T, D) with ``vector`` written (``replace``) or added (``add``) at ``positions[b]``
    of row b; without positions at the last position when T > 1, and nothing at all when T == 1."""
    if positions is None:
        if hidden.shape[1] == 1:
            return hidden
        positions = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out = hidden.clone()
    value = vector.to(hidden.dtype)
    out[rows, positions] = value if mode == "replace" else hidden[rows, positions] + value
    return out


class Vector(nn.Module):
    """The one tensor of a Task or Function Vector student: ``vector`` (hidden,)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(hidden_size))


class VectorAttachment(ModuleAttachment):
    """``module.vector`` replaced into (``replace``) or added to (``add``) the output of decoder layer
    ``layer`` at the last prompt position (see the module docstring)."""

    def __init__(self, model: nn.Module, module: Vector, layer: int, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; expected one of {MODES}")
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} is outside the model's {len(layers)} decoder layers")
        self.layer, self.mode = layer, mode
        self.positions: torch.Tensor | None = None
        inner = attach_output_hooks(model, module, [layers[layer]], self._shift)
        super().__init__(inner.module, inner.handle)

    def _shift(self, _i: int, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = patch_positions(hidden, self.positions, self.module.vector, self.mode)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    @contextmanager
    def at_positions(self, positions: torch.Tensor) -> Iterator[None]:
        """Act at ``positions`` (B,) for the forwards inside (right-padded prompts with answers)."""
        previous, self.positions = self.positions, positions
        try:
            yield
        finally:
            self.positions = previous


@dataclass
class ProbeState:
    """Shared by the ``HeadProbe`` of every layer: where to read, what to record and what to patch.

    positions (B,): the position read and patched in each row. record: keep each layer's head outputs
    there, ``recorded[layer]`` (B, H, D) float32. patch_layer / patch_heads (B,) / patch_values (B, D):
    in layer ``patch_layer``, row b's head ``patch_heads[b]`` (-1: none) is replaced by its value.
    """

    positions: torch.Tensor | None = None
    record: bool = False
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)
    patch_layer: int = -1
    patch_heads: torch.Tensor | None = None
    patch_values: torch.Tensor | None = None


class HeadProbe(nn.Module):
    """Reads and patches one layer's per-head attention outputs through the attention function
    (``pipeline.attention``'s ``add_shift`` hook: ``out`` is (B, T, H, D), before ``o_proj``)."""

    def __init__(self, state: ProbeState, layer: int):
        super().__init__()
        self.state, self.layer = state, layer

    def add_shift(self, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                  scaling: float, is_causal: bool = True) -> torch.Tensor:
        st = self.state
        if st.positions is None:
            return out
        rows = torch.arange(out.shape[0], device=out.device)
        if st.record:
            st.recorded[self.layer] = out[rows, st.positions].float()
        if st.patch_layer == self.layer and st.patch_heads is not None:
            chosen = st.patch_heads >= 0
            r = rows[chosen]
            out = out.clone()
            out[r, st.positions[chosen], st.patch_heads[chosen]] = st.patch_values[chosen].to(out.dtype)
        return out


@contextmanager
def head_probe(model: nn.Module) -> Iterator[ProbeState]:
    """Attach a ``HeadProbe`` to every decoder layer (the model must route its attention through
    ``pipeline.attention``); detached on exit, the model as it came."""
    state = ProbeState()
    handle = attach_mimic(model, [HeadProbe(state, i) for i in range(len(decoder_layers(model)))])
    try:
        yield state
    finally:
        handle.detach()


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _forward(loaded: Any, prompts: Sequence[Any], keep_from: int | None = None) -> Any:
    """One right-padded forward without cache; logits from position ``keep_from`` on when the model
    takes ``logits_to_keep`` (the lm_head over every position of a long prompt is wasted work)."""
    batch = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "right")
    batch = to_device(batch, loaded.device, model_dtype(loaded.model))
    width = batch["input_ids"].shape[1]
    extra = {}
    if keep_from is not None and keeps_logits(loaded.model):
        extra = {"logits_to_keep": width - keep_from}
    return loaded.model(**batch, use_cache=False, **extra), width


def mean_layer_states(loaded: Any, prompts: Sequence[Any], batch_size: int) -> torch.Tensor:
    """(L, D) float32: each decoder layer's output at the last prompt position, averaged over ``prompts``
    (the Task Vector of every layer)."""
    capture = StateCapture(loaded.model, "layer")
    total = None
    for chunk in _batches(len(prompts), batch_size):
        batch = [prompts[i] for i in chunk]
        pos = torch.tensor(prompt_ends(batch), device=loaded.device)[:, None]
        with capture, torch.inference_mode():
            capture.positions = pos
            _forward(loaded, batch)
            states = capture.stacked()[:, 0].float().sum(0)  # (L, D)
        total = states if total is None else total + states
    return (total / len(prompts)).cpu()


def mean_head_outputs(loaded: Any, prompts: Sequence[Any], batch_size: int) -> torch.Tensor:
    """(L, H, Dh) float32: each attention head's output (before ``o_proj``) at the last prompt position,
    averaged over ``prompts``."""
    layers = len(decoder_layers(loaded.model))
    total = None
    with head_probe(loaded.model) as probe:
        probe.record = True
        for chunk in _batches(len(prompts), batch_size):
            batch = [prompts[i] for i in chunk]
            probe.positions = torch.tensor(prompt_ends(batch), device=loaded.device)
            with torch.inference_mode():
                _forward(loaded, batch)
            heads = torch.stack([probe.recorded[i].sum(0) for i in range(layers)])  # (L, H, Dh)
            total = heads if total is None else total + heads
    return (total / len(prompts)).cpu()


def answer_probability(out: Any, width: int, prompts: Sequence[Any]) -> torch.Tensor:
    """(B,) float32: the probability of each prompt's first answer token at its last prompt position."""
    logits = out.logits
    offset = width - logits.shape[1]
    rows = torch.arange(len(prompts), device=logits.device)
    pos = torch.tensor(prompt_ends(prompts), device=logits.device) - offset
    if bool((pos < 0).any()):
        raise RuntimeError("logits were not kept at a last prompt position")
    first = torch.tensor([p.encoded.input_ids[p.answer_start] for p in prompts], device=logits.device)
    return torch.softmax(logits[rows, pos].float(), -1)[rows, first]


def causal_indirect_effects(loaded: Any, shuffled: Sequence[Any], means: torch.Tensor, rows: int = 32,
                            progress: Any = None) -> torch.Tensor:
    """(L, H) float32: each head's average causal indirect effect over the ``shuffled`` prompts (ICL
    prompts whose demonstration answers are permuted, the correct answer teacher-forced):
    P(answer | prompt, head := its mean output ``means[l, h]``) - P(answer | prompt), at the last prompt
    position. Every forward holds up to ``rows`` (prompt, head) pairs of one layer."""
    n_layers, n_heads, _ = means.shape
    device = loaded.device
    means = means.to(device)
    cie = torch.zeros(n_layers, n_heads)
    per = max(1, rows // n_heads)  # prompts per forward, each repeated once per head
    for chunk in _batches(len(shuffled), per):
        batch = [shuffled[i] for i in chunk]
        ends = prompt_ends(batch)
        keep_from = min(ends)
        with head_probe(loaded.model) as probe, torch.inference_mode():
            probe.positions = torch.tensor(ends, device=device)
            base = answer_probability(*_forward(loaded, batch, keep_from), batch)  # (b,)
            repeated = [p for p in batch for _ in range(n_heads)]
            probe.positions = torch.tensor(prompt_ends(repeated), device=device)
            probe.patch_heads = torch.arange(n_heads, device=device).repeat(len(batch))
            for layer in range(n_layers):
                probe.patch_layer = layer
                probe.patch_values = means[layer][probe.patch_heads]
                patched = answer_probability(*_forward(loaded, repeated, keep_from), repeated)
                cie[layer] += (patched.view(len(batch), n_heads) - base[:, None]).sum(0).cpu()
        if progress is not None:
            progress.update(len(batch))
    return cie / len(shuffled)


def top_heads(cie: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of highest effect; ties go to the earlier layer, then head."""
    n_heads = cie.shape[1]
    order = sorted(range(cie.numel()), key=lambda i: (-float(cie.view(-1)[i]), i))
    return [(i // n_heads, i % n_heads) for i in order[:k]]


def o_proj_of(layer: nn.Module) -> nn.Linear:
    """A decoder layer's attention output projection (``self_attn.o_proj``)."""
    proj = getattr(layer.self_attn, "o_proj", None)
    if not isinstance(proj, nn.Linear):
        raise ValueError(f"{type(layer.self_attn).__name__} has no o_proj linear layer: a Function Vector needs it")
    return proj


def function_vector(model: nn.Module, means: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(D,) float32: sum over ``heads`` of head h's mean output through its columns of layer l's
    ``o_proj`` (``W_O[:, h*Dh:(h+1)*Dh] @ mean[l, h]``). Without the projection's bias: a head's share of
    the residual stream is its columns' product; a bias is added once per layer, not per head."""
    layers = decoder_layers(model)
    d = means.shape[-1]
    total = None
    for layer, head in heads:
        weight = o_proj_of(layers[layer]).weight.detach().float().cpu()
        part = weight[:, head * d : (head + 1) * d] @ means[layer, head].float()
        total = part if total is None else total + part
    return total
