"""Compiled decoding: every generated token after the first through one compiled forward over a
static KV cache (CUDA graphs on CUDA), for the base model and for students alike.

Why: on the benchmark GPU a decode step is host-bound (20-50 us of CPU per eager op, ~1,000 ops per
step of an 8B model, more with MimIC's per-layer shift), so students and the base model generate at
the speed of Python, not of the GPU (docs/benchmarks.md). A compiled step replays the whole forward
as one graph.

How, with transformers' own parts: a ``StaticCache`` (fixed shapes, tensors at fixed addresses) and
``torch.compile`` of the model's forward, used only for steps of one new token (the prefill, of every
prompt length, stays eager, as transformers' own auto-compilation does). Two things transformers does
not do for us, hence this module:
- beam search: transformers 5.24 compiles only greedy/sampling decoding, and its static cache reorders
  beams by *replacing* its tensors (``index_select``), which moves them and forces a new graph at every
  step; the caches made here reorder in place.
- shapes: the cache length is rounded up to ``bucket`` tokens and each cache is kept for reuse by
  (rows, length), so a whole evaluation compiles a handful of graphs, not one per prompt length.
The values are the eager model's within float tolerance (``tests/test_decoding.py``: sequences equal
and logits close, base model and MimIC student, greedy and beam search, left padding); a compiler
failure turns compilation off with a warning and the batch is generated eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.settings import COMPILE_CHOICES

AUTO_COMPILE_QUERIES = 1000
"""evaluate --compile auto compiles from this many queries per mode on. On the H200 (Idefics2-8B shape,
3 beams, docs/benchmarks.md) a compiled decode saves ~0.2 s per query at batch 1 and compiling takes about
a minute per mode and shape: a loss on the default 200 queries, a clear gain on VQAv2's 10,000."""


def wants_compile(choice: str, device: torch.device, amount: int | None = None, at_least: int = 0) -> bool:
    """``--compile``: on compiles on any device, off never, auto on CUDA only (the CPU gains little and
    compiles for minutes on a large model) and only when ``amount`` (queries, steps) reaches ``at_least``."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, not {choice!r}")
    return choice == "on" or (choice == "auto" and device.type == "cuda" and (amount is None or amount >= at_least))


RECOMPILE_LIMIT = 64
"""torch.compile's recompile limit once compiling is on: one graph per shape bucket, per student switch state
and per frame around a VLM's graph breaks; the default of 8 would silently fall back to eager in a long run."""


def compile_fn(fn: Callable, **options: Any) -> Callable:
    """``torch.compile(fn, **options)`` with the recompile limit raised to ``RECOMPILE_LIMIT`` (process-wide)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, **options)


@contextlib.contextmanager
def forward_replaced(model: torch.nn.Module, fn: Callable) -> Iterator[None]:
    """``model.forward`` is ``fn`` while the block runs, showing the model's own signature (``generate``
    chooses its inputs, e.g. the position_ids of left-padded rows, by reading it); afterwards the instance
    attribute is exactly as it was (the class's forward, or an instance forward such as accelerate's hooks)."""
    own = model.__dict__.get("forward")

    def call(*args: Any, **kwargs: Any) -> Any:  # a function of its own: a bound method takes no attributes
        return fn(*args, **kwargs)

    model.forward = functools.wraps(model.forward)(call)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _reorder_in_place(layer: Any, beam_idx: torch.Tensor) -> None:
    """``StaticLayer.reorder_cache`` writing into the same tensors (the compiled graph reads their addresses)."""
    if layer.is_initialized:
        idx = beam_idx.to(layer.keys.device)
        layer.keys.copy_(layer.keys.index_select(0, idx))
        layer.values.copy_(layer.values.index_select(0, idx))


class CompiledDecoding:
    """``generate`` with its decode steps compiled; one per loaded model (it patches ``model.forward``
    only while a call runs). ``bucket``: cache lengths are rounded up to a multiple of it."""

    def __init__(self, model: torch.nn.Module, bucket: int = 64, mode: str | None = None):
        self.model, self.bucket = model, bucket
        on_cuda = next(model.parameters()).device.type == "cuda"
        # reduce-overhead = inductor + CUDA graphs; CUDA graphs do not exist on the CPU
        self.mode = mode or ("reduce-overhead" if on_cuda else "default")
        self.enabled = True
        self.caches: dict[tuple[int, int], Any] = {}
        self.steps = {"compiled": 0, "eager": 0}  # forward calls by kind, over this object's life
        self._eager: Callable | None = None
        self._compiled: Callable | None = None

    def cache_for(self, rows: int, length: int) -> Any:
        """A reset static cache for ``rows`` sequences (prompts x beams) of up to ``length`` tokens."""
        from transformers import StaticCache

        size = -(-length // self.bucket) * self.bucket
        cache = self.caches.get((rows, size))
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=size)
            for layer in cache.layers:
                layer.reorder_cache = types.MethodType(_reorder_in_place, layer)
            self.caches[(rows, size)] = cache
        else:
            cache.reset()
        return cache

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        decode = ids is not None and ids.ndim == 2 and ids.shape[1] == 1 and kwargs.get("pixel_values") is None
        if decode:
            self.steps["compiled"] += 1
            return self._compiled(*args, **kwargs)
        self.steps["eager"] += 1
        return self._eager(*args, **kwargs)

    def generate(self, batch: dict[str, Any], max_new_tokens: int, num_beams: int, **kwargs: Any) -> Any:
        """``model.generate(**batch, ...)`` with compiled decode steps; eager (and compilation off from
        then on, with a warning) when the compiler fails."""
        model = self.model
        if not self.enabled:
            return model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, **kwargs)
        if self._compiled is None:
            self._eager = model.forward
            self._compiled = compile_fn(model.forward, mode=self.mode)  # shapes: static, then dynamic after a change
        rows = batch["input_ids"].shape[0] * num_beams
        cache = self.cache_for(rows, batch["input_ids"].shape[1] + max_new_tokens)
        try:
            with forward_replaced(model, self._forward):
                return model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, cache=cache,
                                      disable_compile=True, **kwargs)
        except Exception as err:  # a compiler failure must not lose an evaluation: eager computes the same
            if not compiler_error(err):
                raise
            self.enabled = False
            warnings.warn(f"compiled decoding failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          "generating eagerly from now on (--compile off skips the attempt)", stacklevel=2)
        return model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, **kwargs)


def compiler_error(err: BaseException) -> bool:
    """Whether ``err`` comes from torch.compile (dynamo, inductor, a missing C++ compiler or triton)."""
    names = {type(e).__module__ for e in _chain(err)}
    return any(n.startswith(("torch._dynamo", "torch._inductor", "torch.fx", "triton")) for n in names) or \
        "compile" in type(err).__name__.lower()


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
