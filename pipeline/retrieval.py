"""Demonstrations by similarity (``--demos similar``, RICES as in LIVE's code): the k support examples
nearest to the query by cosine similarity of the model's own embeddings.

Embeddings (``METHODS``, recorded in the cache key):

- ``image-features-mean`` (tasks with images): the mean of the image features the model already computes
  for its language model: the decoder's input embeddings at the image placeholder positions (the
  projector's output; LLaVA, Idefics2/3, Qwen-VL), captured by a pre-hook that stops the forward before
  the first decoder layer runs. Idefics1 feeds images by cross-attention, not in the sequence: there the
  vision tower's pooled output (mean of its last hidden state where it has no pooler).
- ``text-last-hidden-mean`` (text-only tasks): the mean of the base language model's last hidden state
  over the question's tokens (BOS + ``Example.question`` alone, no prompt template: template words shared
  by every example would pull all similarities towards 1; BOS excluded from the mean).

The support embeddings are computed once per (model fingerprint, task, support ids, method) and kept in
``<cache>/retrieval/`` (``pipeline.models.cache_root``: ``$MIMIC_CACHE`` or the project's ``cache/``) as a
safetensors file whose metadata repeats the key; a file of another key is never read, so a changed support
set (its ids or, by ``content_stamp``, its rows) or model computes them again. Query embeddings are
computed as they are needed (batched by ``DemoIndex.add_queries``) and kept in memory.

Order: the k nearest by descending cosine similarity, ties to the lower support index, then reversed, so
the most similar demonstration comes last, nearest the query (as RICES implementations order them). The
query is never its own demonstration: support examples with the query's id are excluded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.config import UserError
from pipeline.tasks.base import Example

IMAGE_METHOD = "image-features-mean"
TEXT_METHOD = "text-last-hidden-mean"
METHODS = (IMAGE_METHOD, TEXT_METHOD)
CACHE_SUBDIR = "retrieval"
BATCH = 16
"""Examples per embedding forward."""

Embed = Callable[[Sequence[Example]], torch.Tensor]
"""examples -> (n, d) embeddings."""


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is not run."""


def method_for(examples: Sequence[Example]) -> str:
    """The embedding of a task's examples: of the image when its examples have images, else of the text."""
    return IMAGE_METHOD if len(examples) and examples[0].image is not None else TEXT_METHOD


def _ids(examples: Sequence[Example]) -> list[str]:
    # .ids() reads one column instead of building every example (a hub split)
    return [str(i) for i in examples.ids()] if hasattr(examples, "ids") else [str(e.id) for e in examples]


def content_stamp(examples: Sequence[Example]) -> str:
    """What the examples hold, beyond their ids (a user task's rows are numbered, so an edited data file
    keeps its ids): a split over a ``datasets.Dataset`` (``ExampleView``) by the dataset's fingerprint,
    which ``datasets`` derives from the files' modification times or the rows themselves; a list of
    examples by their questions and images."""
    dataset = getattr(examples, "dataset", None)
    if isinstance(getattr(dataset, "_fingerprint", None), str):
        return dataset._fingerprint
    digest = hashlib.sha256()
    for e in examples:
        image = e.image
        if hasattr(image, "tobytes"):  # a PIL image: its pixels
            image = hashlib.sha256(image.tobytes()).hexdigest()
        digest.update(json.dumps([str(e.id), e.question, str(image)]).encode())
    return digest.hexdigest()


def index_key(fingerprint: str, task: str, support_ids: Sequence[str], method: str, content: str = "") -> str:
    """What identifies a support set's embeddings: model, task, the support ids in order, the method and
    the examples' ``content_stamp``."""
    ids = hashlib.sha256("\n".join(support_ids).encode()).hexdigest()
    return hashlib.sha256(json.dumps([fingerprint, task, ids, method, content]).encode()).hexdigest()


def nearest(support: torch.Tensor, support_ids: Sequence[str], query: torch.Tensor, query_id: str, k: int
            ) -> list[int]:
    """Indices of the ``k`` rows of ``support`` (n, d) with the highest cosine similarity to ``query`` (d,),
    rows with id ``query_id`` excluded; the most similar last (see the module docstring)."""
    keep = torch.tensor([str(i) != str(query_id) for i in support_ids], dtype=torch.bool)
    available = int(keep.sum())
    if available < k:
        raise UserError(f"cannot choose {k} demonstrations for query {query_id}: the support split has only "
                        f"{available} other examples; lower the number of shots or enlarge the support split")
    sims = torch.nn.functional.normalize(support.double(), dim=-1) @ torch.nn.functional.normalize(
        query.double(), dim=-1)
    sims = sims.masked_fill(~keep, float("-inf"))
    order = torch.sort(-sims, stable=True).indices[:k]  # descending similarity, ties to the lower index
    return [int(i) for i in reversed(order.tolist())]


class DemoIndex:
    """The support embeddings of one (model, task) and the nearest-k search; queries embedded on demand."""

    def __init__(self, support_ids: Sequence[str], embeddings: torch.Tensor, method: str, embed: Embed, key: str):
        self.support_ids, self.embeddings, self.method, self.embed, self.key = (
            list(support_ids), embeddings, method, embed, key)
        self._queries: dict[str, torch.Tensor] = {}

    def add_queries(self, queries: Sequence[Example]) -> None:
        """Embed the queries not yet known, in batches (call it before asking for many queries)."""
        todo = list({str(q.id): q for q in queries if str(q.id) not in self._queries}.values())
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            for q, row in zip(chunk, self.embed(chunk), strict=True):
                self._queries[str(q.id)] = row

    def nearest(self, query: Example, k: int) -> list[int]:
        """Support indices of the ``k`` demonstrations of ``query`` (the most similar last)."""
        if str(query.id) not in self._queries:
            self.add_queries([query])
        return nearest(self.embeddings, self.support_ids, self._queries[str(query.id)], str(query.id), k)


def cache_path(task: str, method: str, key: str, cache_dir: str | Path | None = None) -> Path:
    from pipeline.models import cache_root

    name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', task)}-{method}-{key[:24]}.safetensors"
    return cache_root(cache_dir) / CACHE_SUBDIR / name


def _read(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached embeddings at ``path`` if they are the ones of ``key`` (n rows), else None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            tensor = f.get_tensor("embeddings")
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError):  # absent, truncated or foreign: again
        return None
    return tensor if tensor.ndim == 2 and tensor.shape[0] == n else None


def _write(path: Path, embeddings: torch.Tensor, metadata: dict[str, str]) -> None:
    """Through a fresh temporary file renamed into place (readers never see half a file); best effort."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a fresh name per writer, created by save_file with the umask's permissions (mkstemp's are 0600)
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            save_file({"embeddings": embeddings.contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:  # an unwritable cache only means computing them again next time
        print(f"note: similarity index not cached ({err})")


def build_index(support: Sequence[Example], *, fingerprint: str, task: str, method: str, embed: Embed,
                cache_dir: str | Path | None = None) -> DemoIndex:
    """The support set's index: its embeddings read from the cache when they were computed for the same
    model, task, support ids and rows (``content_stamp``) and method, else computed with ``embed`` (in
    batches) and cached."""
    ids = _ids(support)
    key = index_key(fingerprint, task, ids, method, content_stamp(support))
    path = cache_path(task, method, key, cache_dir)
    embeddings = _read(path, key, len(ids))
    if embeddings is None:
        rows = [embed([support[j] for j in range(i, min(i + BATCH, len(ids)))]) for i in range(0, len(ids), BATCH)]
        embeddings = torch.cat(rows).float().cpu() if rows else torch.zeros(0, 0)
        _write(path, embeddings, {"key": key, "model_fingerprint": fingerprint, "task": task, "method": method,
                                  "n": str(len(ids))})
    return DemoIndex(ids, embeddings, method, embed, key)


def model_index(loaded: Any, task: Any, cache_dir: str | Path | None = None) -> DemoIndex:
    """The index of ``task``'s support split with ``loaded``'s own embeddings (the base model: a student
    must be switched off while this embeds)."""
    support = task.split("support")
    method = method_for(support)
    return build_index(support, fingerprint=loaded.source.fingerprint, task=task.name, method=method,
                       embed=lambda examples: embed_examples(loaded, task, examples, method), cache_dir=cache_dir)


@torch.inference_mode()
def embed_examples(loaded: Any, task: Any, examples: Sequence[Example], method: str) -> torch.Tensor:
    """(n, d) float32 embeddings of ``examples`` by ``method`` (see the module docstring), one forward."""
    if method == IMAGE_METHOD:
        return _image_embeddings(loaded, task, examples)
    if method == TEXT_METHOD:
        return _text_embeddings(loaded, examples)
    raise ValueError(f"unknown embedding method {method!r}; valid: {', '.join(METHODS)}")


def _to_device(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _image_embeddings(loaded: Any, task: Any, examples: Sequence[Example]) -> torch.Tensor:
    from pipeline.families.base import token_id, tokenizer_of
    from pipeline.prompts import build_prompt

    if any(e.image is None for e in examples):
        missing = next(e.id for e in examples if e.image is None)
        raise UserError(f"--demos similar embeds the images of task {task.name}, but example {missing} has none")
    family, processor, model = loaded.family, loaded.processor, loaded.model
    prompts = [build_prompt(family, processor, task.spec, e, [], [], None) for e in examples]
    batch = _to_device(family.collate([p.encoded for p in prompts], processor, "right"), loaded.device)
    decoder = model.get_decoder()
    got: dict[str, torch.Tensor] = {}
    vision = getattr(decoder, "vision_model", None)  # Idefics1: the tower sits inside the decoder (cross-attention)
    if vision is not None:
        def hook(_module: Any, _args: Any, out: Any) -> None:
            pooled = getattr(out, "pooler_output", None)
            got["x"] = pooled if pooled is not None else out.last_hidden_state.mean(1)
            raise _Stop

        handle = vision.register_forward_hook(hook)
    else:
        image_id = token_id(tokenizer_of(processor), family.image_token)
        if image_id is None:
            raise UserError(f"--demos similar: {family.name} has no image token to read image features at")

        def hook(_module: Any, _args: Any, kwargs: dict) -> None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise UserError(f"--demos similar: {family.name} passes no input embeddings to its language model")
            at = (batch["input_ids"] == image_id).to(embeds.device)
            if not bool(at.any(-1).all()):
                raise UserError(f"--demos similar: a {family.name} prompt holds no image features to embed")
            got["x"] = (embeds * at[..., None]).sum(1) / at.sum(1, keepdim=True)
            raise _Stop

        handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise UserError(f"--demos similar: the {family.name} forward never reached its image features")
    return got["x"].float().reshape(len(examples), -1).cpu()


def _text_embeddings(loaded: Any, examples: Sequence[Example]) -> torch.Tensor:
    from pipeline.families.base import Segment

    family, processor = loaded.family, loaded.processor
    encoded = [family.bos(processor) + family.encode(processor, Segment(e.question)) for e in examples]
    batch = _to_device(family.collate(encoded, processor, "right"), loaded.device)
    out = loaded.model.get_decoder()(**batch)  # Idefics1's decoder also takes the blank images its collate adds
    mask = batch["attention_mask"].clone()
    mask[:, 0] = 0  # BOS: the same for every example
    mask = mask.to(out.last_hidden_state.dtype)
    if bool((mask.sum(1) == 0).any()):  # an empty question: fall back to the BOS state rather than divide by 0
        mask[mask.sum(1) == 0, 0] = 1
    return ((out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).float().cpu()
