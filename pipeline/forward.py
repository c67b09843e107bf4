"""The one forward path of every stage: run the model on a batch of prompts and capture the
per-layer states at the aligned positions (query + answer tokens, BOS excluded; docs/architecture.md §4).

Stage 1 runs it for the k-shot teacher (``TeacherRunner``, batched by length, with out-of-memory
back-off), stage 2 for the student (with gradients) and, online, the teacher; evaluation's L2
analysis for zero-shot and student states. Also the host <-> device moves they share.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.capture import StateCapture, span_positions
from pipeline.families.base import pad_token_id, tokenizer_of
from pipeline.runtime import Loaded


@dataclass
class Forward:
    """One captured forward. output: the model's output (logits (B, T, V) or the last position's);
    states: (B, S, L, D) at the aligned positions, in the model's dtype; positions: (B, S) token
    index of each aligned position; mask: (B, S) bool, False where a shorter prompt is padded;
    batch: the model inputs on the device."""

    output: Any
    states: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    batch: dict


def forward_states(loaded: Loaded, capture: StateCapture, prompts: list[Any], batch: dict | None = None,
                   **model_kwargs: Any) -> Forward:
    """Collate ``prompts`` (right padding; ``batch`` when already collated), move to the device, run the
    model with ``capture`` on the aligned positions. Gradients flow unless the caller disables them."""
    lengths = [len(p.encoded) for p in prompts]
    starts = [p.span_start for p in prompts]
    width = max(n - s for n, s in zip(lengths, starts, strict=True))
    dtype = next(loaded.model.parameters()).dtype
    if batch is None:
        batch = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "right")
    batch = to_device(batch, loaded.device, dtype)
    pos, mask = span_positions(lengths, starts, width, loaded.device)
    with capture:
        capture.positions = pos
        out = loaded.model(**batch, use_cache=False, **model_kwargs)
        states = capture.stacked()
    return Forward(out, states, pos, mask, batch)


def pad_states(states: list[torch.Tensor], width: int) -> torch.Tensor:
    """(T_i, ...) tensors -> (B, width, ...) zero-padded."""
    out = states[0].new_zeros((len(states), width, *states[0].shape[1:]))
    for b, s in enumerate(states):
        out[b, : s.shape[0]] = s
    return out


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a collated batch; floating tensors (pixels) take the model's dtype, cast on ``device``.

    The copy is ``non_blocking``: asynchronous from page-locked memory (``pin_batch``), an ordinary
    copy from pageable memory; the model then reads the tensors on the same stream, after the copy.
    """
    def move(v: torch.Tensor) -> torch.Tensor:
        v = v.to(device, non_blocking=True)
        return v.to(dtype) if v.is_floating_point() else v

    return {k: move(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def pin_batch(batch: dict, pin: bool) -> dict:
    """The collated batch with its tensors in page-locked memory when ``pin`` (CUDA), unchanged otherwise
    (tensors already page-locked, as ``collate(..., pin=True)`` builds the images, are kept as they are).

    Pinned, ``to_device`` copies asynchronously; from pageable memory the host-to-device copy took
    1.2 s of a 24 s Idefics2 run on the critical path (docs/benchmarks.md B1). Pixels stay float32
    here: a host-side cast would make a new, pageable tensor; ``to_device`` casts on the device.
    """
    if not pin:
        return batch
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def cast_images(prompt: Any, dtype: torch.dtype) -> Any:
    """``prompt`` with its floating image tensors in ``dtype`` when that is a 16-bit model dtype, else as it is.

    The same values ``to_device`` gives (a float32 -> bfloat16/float16 cast rounds to nearest even on the CPU
    as on the GPU), made on the host: teacher-cache's prompt workers send half the bytes to the main process,
    which then collates, pins and copies half as much (docs/benchmarks.md, third round)."""
    if dtype not in (torch.bfloat16, torch.float16) or not prompt.encoded.images:
        return prompt
    images = [{k: v.to(dtype) if torch.is_tensor(v) and v.dtype == torch.float32 else v for k, v in image.items()}
              for image in prompt.encoded.images]
    return dataclasses.replace(prompt, encoded=dataclasses.replace(prompt.encoded, images=images))


def without_images(prompt: Any) -> Any:
    """``prompt`` with each image's tensors left out (``None`` in their place, so that collating it fails
    at once instead of running the model without its images); its ids, spans and image count stay.

    What a teacher-cache prompt worker sends back beside the batches it collated (``ShardData``): the
    per-image tensors were a second copy of the pixels, ~290 tensors a shard, each crossing processes as
    its own shared-memory file; the main process needs the prompts' lengths and spans only."""
    if not prompt.encoded.images:
        return prompt
    encoded = dataclasses.replace(prompt.encoded, images=[None] * len(prompt.encoded.images))
    return dataclasses.replace(prompt, encoded=encoded)


def to_host(t: torch.Tensor, wait: bool = True) -> torch.Tensor:
    """Device -> host through page-locked memory, which torch's caching host allocator reuses: a
    fresh pageable buffer per batch (and a copy per sample) cost ~0.16 s per Idefics2 batch of 8 on
    the benchmark VM (docs/benchmarks.md). ``wait`` False: the copy is only issued (read the result after
    the stream's work so far is done, e.g. an event recorded after this call)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=not wait)
    return out


TEACHER_PAD_MULTIPLE = 8
"""A padded teacher batch is padded further, to a multiple of this many tokens (``teacher_padding``)."""


def teacher_padding(loaded: Loaded, lengths: Sequence[int]) -> int:
    """``pad_to_multiple_of`` for a teacher batch of prompts of these lengths: ``TEACHER_PAD_MULTIPLE`` when the
    batch is padded anyway (two lengths or more), else 1, and 1 where the rounded length would pass the model's
    positions. Why: on CUDA, a padded batch runs the masked attention, and torch's cuDNN attention builds
    kernels for it on first use per alignment of the padded length, 1-2 s each on a fresh machine
    (docs/benchmarks.md, sixth round). Rounded to a multiple of 8 every padded batch has one alignment, which
    the warm-up forward builds while the plan is made. A batch of one length stays unpadded: it passes no
    mask and runs the unmasked kernel (padding it would change which kernel computes it). The extra columns
    are masked like any padding (tests: the stored states equal a forward of each prompt alone)."""
    if len(set(lengths)) < 2:
        return 1
    width = -(-max(lengths) // TEACHER_PAD_MULTIPLE) * TEACHER_PAD_MULTIPLE
    config = loaded.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(config, "max_position_embeddings", None)
    return 1 if isinstance(positions, int) and width > positions else TEACHER_PAD_MULTIPLE


class TeacherRunner:
    """Teacher forwards for a list of samples, batched by length, with out-of-memory back-off."""

    def __init__(self, loaded: Loaded, layer_target: str, topk: int = 0, batch_size: int = 0):
        """``topk``: also return that many answer log-probs per token (0: none). ``batch_size``: forwards
        per batch; 0 = auto (16 on CUDA, 4 on CPU, halved on out-of-memory)."""
        self.loaded, self.topk, self.fixed_batch = loaded, topk, bool(batch_size)
        self.batch_size = batch_size or (16 if loaded.device.type == "cuda" else 4)
        self.keep_logits = keeps_logits(loaded.model)
        self.capture = StateCapture(loaded.model, layer_target)
        self.pin = loaded.device.type == "cuda"

    def collate_sorted(self, prompts: list[Any]) -> tuple[int, list[tuple[list[int], dict]]]:
        """(batch size, [(prompt indices, CPU batch)]): ``launch_sorted``'s batches, collated ahead of time
        (and page-locked on CUDA, so their host-to-device copies are asynchronous)."""
        return self.pin_sorted(sorted_batches(self.loaded, prompts, self.batch_size, self.pin))

    def pin_sorted(self, collated: tuple[int, list[tuple[list[int], dict]]]) -> tuple[int, list]:
        """``collate_sorted``'s result with every batch page-locked on CUDA (batches collated elsewhere,
        e.g. in a prompt worker, arrive in pageable memory)."""
        size, chunks = collated
        return size, [(c, pin_batch(b, self.pin)) for c, b in chunks]

    @torch.inference_mode()
    def forward(self, prompts: list[Any], to_cpu: bool = True, batch: dict | None = None) -> list[tuple[torch.Tensor, Any, Any]]:
        """States (T_span, L, D) bf16 (on CPU unless ``to_cpu`` is False) and optional top-k
        (values, indices) per prompt. ``batch``: the prompts already collated."""
        if to_cpu:
            return self.launch(prompts, batch)()
        run, topk = self._run(prompts, batch)
        tk = (topk.values, topk.indices) if topk is not None else None
        return [(hs.clone(), *k) for hs, *k in _per_prompt(run.states.to(torch.bfloat16), tk, prompts)]

    @torch.inference_mode()
    def launch(self, prompts: list[Any], batch: dict | None = None) -> Callable[[], list[tuple[torch.Tensor, Any, Any]]]:
        """``forward(prompts, batch=batch)`` without waiting for the device: the forward is issued and its
        states (and top-k) copied to page-locked host memory asynchronously; the returned function waits
        for that copy and gives ``forward``'s per-prompt results. Why: waiting at once left the device
        idle while the host built the results and issued the next batch, ~24 ms per Idefics2 batch of 8
        on the H200 (docs/benchmarks.md, eighth round); a caller that issues the next batch before
        finishing this one keeps the device busy. Nothing blocks on the CPU, where the copies are plain."""
        run, topk = self._run(prompts, batch)
        states = to_host(run.states.to(torch.bfloat16), wait=False)
        tk = (to_host(topk.values, wait=False), to_host(topk.indices, wait=False)) if topk is not None else None
        done = None
        if run.states.is_cuda:
            done = torch.cuda.Event()
            done.record()

        def finish() -> list[tuple[torch.Tensor, Any, Any]]:
            if done is not None:
                done.synchronize()
            return _per_prompt(states, tk, prompts)

        return finish

    def _run(self, prompts: list[Any], batch: dict | None) -> tuple[Forward, Any]:
        """The captured forward of ``prompts`` and its top-k answer log-probs (None without ``topk``)."""
        lengths, starts = _lengths(prompts), _starts(prompts)
        if batch is None:
            batch = self.loaded.family.collate([p.encoded for p in prompts], self.loaded.processor, "right",
                                               pad_to_multiple_of=teacher_padding(self.loaded, lengths))
        # logits only where they are used: the last position (none needed), or with top-k the positions
        # from the earliest span start on (right padding: every span lies in the last width - min(start)),
        # not over the demonstrations (an lm_head over all of them was ~20% of a small model's forward)
        keep = (batch["input_ids"].shape[1] - min(starts)) if self.topk else 1
        extra = {"logits_to_keep": keep} if self.keep_logits else {}
        run = forward_states(self.loaded, self.capture, prompts, batch, **extra)
        out, pos = run.output, run.positions
        if not self.topk:
            return run, None
        offset = run.batch["input_ids"].shape[1] - out.logits.shape[1]  # 0 when every position has logits
        # every aligned position is at or after its prompt's span start (span_positions): checked on the host,
        # which a device comparison would make wait for the forward
        if min((s for n, s in zip(lengths, starts, strict=True) if n > s), default=offset) < offset:
            raise RuntimeError(f"top-k logits kept from position {offset}, but a span starts before it")
        idx = (pos - offset).clamp(min=0)[..., None].expand(-1, -1, out.logits.shape[-1])
        logp = torch.log_softmax(torch.gather(out.logits, 1, idx).float(), -1)
        return run, logp.topk(self.topk, dim=-1)

    def launch_sorted(self, prompts: list[Any], collated: tuple | None = None,
                      rebuild: Callable[[], list[Any]] | None = None) -> Callable[[], list[tuple[torch.Tensor, Any, Any]]]:
        """Batches of similar length, each issued with ``launch``; the returned function waits for them and
        gives the results in the order of ``prompts``. Halves the batch on CUDA out-of-memory
        (``--batch-size 0``; raised while a batch is issued, so the batches issued before stay valid).
        ``collated``: ``collate_sorted(prompts)``, used while the batch size is the one it was made for.
        ``rebuild``: the same prompts with their images, when ``prompts`` came without them
        (``without_images``) and a new batch size means collating again."""
        issued: list[tuple[list[int], Callable[[], list]]] = []
        if collated is not None and collated[0] == self.batch_size:
            try:
                for chunk, batch in collated[1]:
                    issued.append((chunk, self.launch([prompts[j] for j in chunk], batch=batch)))
                return _gathered(issued, len(prompts))
            except torch.cuda.OutOfMemoryError:
                if self.fixed_batch or self.batch_size == 1:
                    raise
                issued.clear()
                torch.cuda.empty_cache()
                self.batch_size //= 2
        if rebuild is not None:
            prompts = rebuild()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].encoded))
        i = 0
        while i < len(order):
            chunk = order[i : i + self.batch_size]
            try:
                issued.append((chunk, self.launch([prompts[j] for j in chunk])))
                i += len(chunk)
            except torch.cuda.OutOfMemoryError:
                if self.fixed_batch or self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size //= 2
        return _gathered(issued, len(prompts))


def _lengths(prompts: Sequence[Any]) -> list[int]:
    return [len(p.encoded) for p in prompts]


def _starts(prompts: Sequence[Any]) -> list[int]:
    return [p.span_start for p in prompts]


def _per_prompt(states: torch.Tensor, topk: tuple | None, prompts: Sequence[Any]) -> list[tuple[torch.Tensor, Any, Any]]:
    """Each prompt's span of a batch's states (B, S, L, D) and top-k (values, indices) or None: views."""
    return [(states[b, : n - s], *((topk[0][b, : n - s], topk[1][b, : n - s]) if topk else (None, None)))
            for b, (n, s) in enumerate(zip(_lengths(prompts), _starts(prompts), strict=True))]


def _gathered(issued: list[tuple[list[int], Callable[[], list]]], n: int) -> Callable[[], list]:
    """One function finishing every issued batch, its results put back in prompt order."""
    def finish() -> list:
        done = {j: r for chunk, fin in issued for j, r in zip(chunk, fin(), strict=True)}
        return [done[j] for j in range(n)]

    return finish


def sorted_batches(loaded: Loaded, prompts: list[Any], size: int, pin: bool = False
                   ) -> tuple[int, list[tuple[list[int], dict]]]:
    """(size, [(prompt indices, CPU batch)]): ``prompts`` sorted by length and collated (right padding,
    ``teacher_padding``) in batches of ``size``, as ``TeacherRunner.launch_sorted`` runs them."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].encoded))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    return size, [(c, loaded.family.collate(
        [prompts[j].encoded for j in c], loaded.processor, "right", pin=pin,
        pad_to_multiple_of=teacher_padding(loaded, [len(prompts[j].encoded) for j in c]))) for c in chunks]


def keeps_logits(model: Any) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (logits only for the last positions)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def generation_inputs(loaded: Loaded, prompts: Sequence[Any]) -> dict[str, Any]:
    """The left-padded batch ``generate_batch`` hands to ``model.generate`` (every prompt ends at the last
    position of the first forward), on the model's device and dtype."""
    batch = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "left")
    batch.pop("position_ids", None)  # generate derives the same cumsum(mask) - 1 and extends it per step
    return to_device(batch, loaded.device, model_dtype(loaded.model))


def generate_expands_images() -> bool:
    """Whether this transformers' ``generate`` encodes images once and expands them per prompt for the
    beams (``GenerationMixin._expand_multimodal_outputs``)."""
    from transformers.generation.utils import GenerationMixin

    return hasattr(GenerationMixin, "_expand_multimodal_outputs")


def check_beam_images(model: Any, batch: dict[str, Any], prompts: Sequence[Any], num_beams: int) -> None:
    """Refuse beam search that this transformers would run on the wrong images.

    Before the multimodal expansion of ``GenerationMixin._expand_multimodal_outputs`` (absent in
    transformers 5.17, present in 5.24), ``generate`` gives each beam its inputs by
    ``repeat_interleave`` on dim 0 of every tensor. That is right for per-prompt image tensors (Idefics,
    Idefics2/3: ``(batch, images, C, H, W)``) and for one image per prompt, but a flat ``(images, C, H, W)``
    (LLaVA and others) of a prompt with several images becomes image 1, 1, 1, 2, 2, 2, ...: the beams read
    a demonstration's image where the query's belongs, and ICL answers come out well-formed and wrong
    (measured: the demo VLM's 8-shot ICL 16.67 against 58.33, 3 beams, transformers 5.17 vs 5.24,
    docs/results.md). Models that expand their own inputs (Qwen2-VL's override) are left to themselves.
    """
    if num_beams == 1 or batch.get("pixel_values") is None or generate_expands_images():
        return
    from transformers.generation.utils import GenerationMixin

    if type(model)._expand_inputs_for_generation is not GenerationMixin._expand_inputs_for_generation:
        return
    rows = batch["input_ids"].shape[0]
    per_prompt = batch["pixel_values"].ndim == 5 and batch["pixel_values"].shape[0] == rows
    one_each = all(len(p.encoded.images) == 1 for p in prompts) and batch["pixel_values"].shape[0] == rows
    if per_prompt or one_each:
        return
    import transformers

    from pipeline.config import UserError

    raise UserError(
        f"beam search ({num_beams} beams) over prompts with several images is wrong in transformers "
        f"{transformers.__version__}: its generate repeats the images one by one, so beams read the wrong image; "
        "install the locked version (pip install -c requirements.lock transformers, 5.24) or use --num-beams 1"
    )


def generate_batch(loaded: Loaded, prompts: Sequence[Any], max_new_tokens: int, num_beams: int) -> list[str]:
    """Raw generated text (new tokens only) per prompt: left padding (every prompt ends at the last position
    of the first forward), ``num_beams`` beams without sampling, the family's stop strings. Evaluation and
    the layer sweep of the training-free methods generate through it."""
    batch = generation_inputs(loaded, prompts)
    check_beam_images(loaded.model, batch, prompts, num_beams)
    tokenizer = tokenizer_of(loaded.processor)
    options = dict(do_sample=False, num_return_sequences=1, stop_strings=list(loaded.family.stop_strings),
                   tokenizer=tokenizer, pad_token_id=pad_token_id(loaded.processor))
    with torch.inference_mode():
        if loaded.decoding is not None:  # decode steps through a compiled forward (pipeline.decoding)
            out = loaded.decoding.generate(batch, max_new_tokens, num_beams, **options)
        else:
            out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, **options)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
