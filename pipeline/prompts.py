"""Interleaved ICL prompts: ``[BOS] demo_1 ... demo_k query [answer separator]`` as one ``Encoded``.

Every demonstration and the query are tokenised as separate segments and their ids concatenated
(docs/architecture.md §4), so the query (+ answer) ids of a k-shot teacher prompt and of a zero-shot student prompt
are identical; ``check_alignment`` fails loudly when they are not. Both start with the family's BOS.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import UserError
from .families.base import Encoded, Family, Segment, tokenizer_of
from .tasks.base import Example, TaskSpec


@dataclass
class Prompt:
    """An encoded prompt and where its query starts.

    encoded: ids (T,) and per-image tensors of the whole sequence.
    span_start: index of the first query token (the query's image tokens included); the aligned span
        is ``[span_start, T)``.
    answer_start: index of the first teacher-forced answer token, None for a generation prompt.
    """

    encoded: Encoded
    span_start: int
    answer_start: int | None

    @property
    def input_ids(self) -> list[int]:
        return self.encoded.input_ids


def load_image(image: Any) -> Any:
    """An example's image as a PIL RGB image: a path is opened, a PIL image is kept, None stays None."""
    if image is None or not isinstance(image, (str, Path)):
        return image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError as err:
        raise UserError(f"image {image} does not exist; check the task's image paths (relative to its data "
                        "file) or --data-root") from err
    except (UnidentifiedImageError, OSError) as err:  # a text file named .png, a truncated download
        raise UserError(f"image {image} cannot be read as an image ({type(err).__name__}); replace or remove "
                        "that file") from err


def demo_text(spec: TaskSpec, family: Family, example: Example, answer: str) -> str:
    """The text of one demonstration round: prompt, answer, round separator."""
    return spec.query_text(example) + spec.answer.format(answer=answer) + family.round_separator


DEMO_CACHE_BYTES = 2**30
"""Default bound of one ``DemoCache``'s tensors: ~600 Idefics2 images (1.7 MB of pixels each), a
few-hundred-image support set; each DataLoader worker holds its own."""
DEMO_CACHE_ENTRIES = 4096
"""Default bound of one ``DemoCache``'s entries (text-only rounds hold almost no bytes)."""


def copy_encoded(encoded: Encoded) -> Encoded:
    """An ``Encoded`` that shares no list, dict or tensor storage with ``encoded``."""
    images = [{k: v.clone() if torch.is_tensor(v) else v for k, v in image.items()} for image in encoded.images]
    return Encoded(list(encoded.input_ids), images)


def encoded_bytes(encoded: Encoded) -> int:
    """Bytes held by the tensors and ids of an encoding (ids counted as Python ints, ~8 bytes)."""
    tensors = sum(v.nbytes for image in encoded.images for v in image.values() if torch.is_tensor(v))
    return tensors + 8 * len(encoded.input_ids)


def _image_key(image: Any) -> Any:
    """What identifies an example's image besides its id: the path, or an in-memory image's size and mode."""
    if image is None or isinstance(image, (str, Path)):
        return None if image is None else str(image)
    return (type(image).__name__, getattr(image, "size", None), getattr(image, "mode", None))


class DemoCache:
    """Encodings of demonstration rounds (image processing + tokenisation) reused across prompts.

    A support example drawn by many queries is processed once (500 support images and 8 shots x 320
    queries: 2560 encodings of 500 rounds). Least recently used entries leave first once the tensors
    exceed ``max_bytes`` or the entries ``max_entries``; a round larger than ``max_bytes`` is not kept.
    Keys: the example id (unique within a task), the round's full text and the image's path. The
    cache serves one family and processor: called with another, it empties itself first.

    Entries and results share no memory: a hit returns copies (~1% of an Idefics2 image's processing
    time), so neither concatenation nor an in-place edit of a prompt can change a later prompt, and a
    prompt sent from a DataLoader worker moves fresh storage (not the cached one) to shared memory.
    One cache per process: DataLoader workers each fill their own (a pickled cache arrives empty).
    """

    def __init__(self, max_bytes: int = DEMO_CACHE_BYTES, max_entries: int = DEMO_CACHE_ENTRIES):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError(f"DemoCache bounds must be >= 0, got max_bytes={max_bytes}, max_entries={max_entries}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: OrderedDict[tuple, tuple[Encoded, int]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._owner: tuple[Family, Any] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict:
        # pickled (a spawned DataLoader worker): arrive empty instead of copying up to max_bytes
        return {"max_bytes": self.max_bytes, "max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"], state["max_entries"])

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def encode(self, family: Family, processor: Any, demo: Example, text: str) -> Encoded:
        """``family.encode`` of the round ``text`` with ``demo``'s image, from the cache when present."""
        if self._owner is None or self._owner[0] is not family or self._owner[1] is not processor:
            self.clear()
            self._owner = (family, processor)
        key = (str(demo.id), text, _image_key(demo.image))
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return copy_encoded(found[0])
        self.misses += 1
        encoded = family.encode(processor, Segment(text, load_image(demo.image)))
        size = encoded_bytes(encoded)
        if size <= self.max_bytes and self.max_entries > 0:
            self.entries[key] = (copy_encoded(encoded), size)  # compact copies: a view may hold a larger buffer
            self.bytes += size
            while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped
        return encoded


def build_prompt(
    family: Family,
    processor: Any,
    spec: TaskSpec,
    query: Example,
    demos: Sequence[Example],
    demo_answers: Sequence[str],
    answer: str | None,
    demo_cache: DemoCache | None = None,
    answer_offset: int | None = None,
) -> Prompt:
    """BOS + one segment per demonstration + one query segment (prompt, then answer + separator if given).

    The query + answer text is one segment, so teacher and student share its ids exactly.
    ``answer_start`` is found by tokenising the prompt alone and checking it is a prefix of prompt +
    answer; a tokenizer that merges across that boundary raises ValueError. ``demo_cache``: reuse the
    demonstrations' encodings across calls (the prompt is the same with or without it).
    ``answer_offset``: the query segment's answer offset found by an earlier build of the same query and
    answer (stage 1's student prompt); the prompt alone is then not encoded again (its image neither).
    The caller must compare this prompt's query ids with that build's (``check_alignment``).
    """
    if len(demos) != len(demo_answers):
        raise ValueError(f"query {query.id}: got {len(demos)} demonstrations but {len(demo_answers)} answers")
    family.check_processor(processor)
    encoded = family.bos(processor)
    for demo, demo_answer in zip(demos, demo_answers, strict=True):
        text = demo_text(spec, family, demo, demo_answer)
        encoded = encoded + (demo_cache.encode(family, processor, demo, text) if demo_cache is not None
                             else family.encode(processor, Segment(text, load_image(demo.image))))
    span_start = len(encoded)
    image = load_image(query.image)
    prompt_text = spec.query_text(query)
    if answer is None:
        return Prompt(encoded + family.encode(processor, Segment(prompt_text, image)), span_start, None)
    full = family.encode(processor, Segment(prompt_text + spec.answer.format(answer=answer) + family.round_separator,
                                            image))
    if answer_offset is not None:
        if not 0 < answer_offset < len(full):
            raise ValueError(f"query {query.id}: answer_offset {answer_offset} is outside the query segment's "
                             f"{len(full)} tokens; pass the offset of an earlier build of this query, or None")
        return Prompt(encoded + full, span_start, span_start + answer_offset)
    prompt_only = family.encode(processor, Segment(prompt_text, image))
    n = len(prompt_only)
    if full.input_ids[:n] != prompt_only.input_ids or len(full) == n:
        tok = tokenizer_of(processor)
        raise ValueError(
            f"query {query.id}: the prompt's tokens are not a prefix of prompt + answer tokens "
            f"(prompt {spec.prompt_id!r}, answer template {spec.answer!r}, answer {answer!r}); "
            f"the tokenizer merges across the boundary: prompt ends {tok.decode(prompt_only.input_ids[-3:])!r}, "
            f"prompt + answer has {tok.decode(full.input_ids[max(0, n - 3) : n + 2])!r}. "
            "Fix the templates so the answer starts a new token, e.g. prompt '...:' and answer ' {answer}'."
        )
    return Prompt(encoded + full, span_start, span_start + n)


def check_alignment(teacher: Prompt, student: Prompt, query_id: str) -> None:
    """Raise ValueError unless teacher and student have identical ids (and answer offset) from span_start on."""
    t_ids, s_ids = teacher.input_ids[teacher.span_start :], student.input_ids[student.span_start :]
    if t_ids != s_ids:
        first = next((i for i, (a, b) in enumerate(zip(t_ids, s_ids, strict=False)) if a != b), min(len(t_ids), len(s_ids)))
        raise ValueError(
            f"query {query_id}: teacher and student query tokens differ at query offset {first} "
            f"(teacher {len(t_ids)} query tokens, student {len(s_ids)}; teacher id "
            f"{t_ids[first] if first < len(t_ids) else None}, student id {s_ids[first] if first < len(s_ids) else None}). "
            "Both must encode the query as one separately tokenised segment (pipeline.prompts.build_prompt)."
        )
    t_answer = None if teacher.answer_start is None else teacher.answer_start - teacher.span_start
    s_answer = None if student.answer_start is None else student.answer_start - student.span_start
    if t_answer != s_answer:
        raise ValueError(
            f"query {query_id}: the answer starts at query offset {t_answer} in the teacher and {s_answer} in "
            "the student; build both with the same answer"
        )


def render_prompt(prompt: Prompt, processor: Any, min_run: int = 3) -> str:
    """Readable text of a prompt: runs of >= ``min_run`` identical ids as ``tok*N``, and the markers
    ``[[QUERY]]`` at ``span_start`` and ``[[ANSWER]]`` at ``answer_start`` (for snapshots and logs)."""
    tok = tokenizer_of(processor)
    ids = prompt.input_ids
    marks = {prompt.span_start: "[[QUERY]]"}
    if prompt.answer_start is not None:
        marks[prompt.answer_start] = marks.get(prompt.answer_start, "") + "[[ANSWER]]"
    parts, chunk, i = [], [], 0
    while i <= len(ids):
        run = 1
        while i + run < len(ids) and ids[i + run] == ids[i] and (i + run) not in marks:
            run += 1
        if i in marks or i == len(ids) or run >= min_run:
            parts.append(tok.decode(chunk, skip_special_tokens=False))
            chunk = []
        if i == len(ids):
            break
        if i in marks:
            parts.append(marks[i])
        if run >= min_run:
            parts.append(f"{tok.decode([ids[i]], skip_special_tokens=False)}*{run}")
            i += run
        else:
            chunk.append(ids[i])
            i += 1
    return "".join(parts)
