"""Training recipe of the ``smollm2-vlm`` vision tower + projector (SmolLM2 frozen), on rendered shapes.

The 10 image tokens of a scene (CLS + one per cell of its 3x3 grid, ``pipeline.demo_vlm``) are
regressed onto rows of SmolLM2's own input-embedding table (``align_words``):

    CLS      -> E[" two"]                          (the number of shapes, as a word)
    cell c   -> (E[" red"] + E[" circle"]) / 2     (colour and kind of the shape in cell c)
             or E[" nothing"]                      (empty cell)

    loss = || tokens - targets ||^2 / || targets ||^2      (mean over batch, tokens and dimensions)

with AdamW, cosine schedule with 10% warm-up, gradient clip 1.0. The language model is never run
(its embedding table is only read), so a step costs a few milliseconds per image: 600 steps of 64
scenes take about 35 s on 2 CPU cores. The image tokens then sit where SmolLM2's word embeddings
live, so the frozen LM reads an image roughly as the words of its scene; it was never shown the
task's ``Question:... Short answer:`` format, which it only meets in demonstrations.

Measured (``bench/demo_vlm_icl.py``, n = 200, 8-shot, greedy): on ``shapes_group_vqa`` this recipe
(half mixed, half group scenes) 65.5%; trained on mixed scenes only 65.0% (n = 120); summed instead of
averaged (colour, kind) targets 66.7% (n = 120). On the mixed ``shapes_vqa`` the mixed-only recipe
scored 41.5%; there, adding a second stage of next-token cross-entropy through the frozen LM on
captions and full-sentence facts (300-800 steps of 8, 5-16 min) *lowered* 8-shot ICL to 22-32%; a
reading-order layout (colour, kind, colour, kind, ...) fitted worse (loss 0.14) and scored 35%; the
count as a digit scored 39.5%.

Training scenes come from their own seed stream, and scenes equal to any scene of the default
shapes tasks (either style) are dropped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.tasks.synthetic import GRID, NUMBER_WORDS, Scene, make_scenes, render_scene

TASK_SCENES = (1700, 3407)
"""(eval + train + support sizes, seed) of the default ``shapes_vqa`` and ``shapes_group_vqa``
(and their caption tasks): never trained on, in either style."""
EMPTY_WORD = "nothing"


@dataclass(frozen=True)
class RecipeConfig:
    """Hyper-parameters of the recipe (recorded in the JSON next to the weights)."""

    seed: int = 0
    """Seeds the tower/projector init, the scene stream (``make_scenes(n, 10_000 + seed)``) and batches."""
    scenes: int = 4000
    """Distinct training scenes (rendered at access)."""
    group_fraction: float = 0.5
    """Share of the training scenes in the ``group`` style (1-4 copies of one coloured shape)."""
    steps: int = 600
    """Optimiser steps."""
    batch: int = 64
    """Scenes per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (no weight decay)."""
    threads: int = 2
    """torch CPU threads (results are bit-identical for a fixed seed and thread count)."""


def training_scenes(cfg: RecipeConfig) -> list[Scene]:
    """``cfg.scenes`` distinct scenes (``group_fraction`` of them groups), none equal to a scene of
    the default shapes tasks of either style."""
    held_out = set(make_scenes(*TASK_SCENES)) | set(make_scenes(*TASK_SCENES, style="group"))
    n_group = round(cfg.scenes * cfg.group_fraction)
    scenes: list[Scene] = []
    for style, n in (("mixed", cfg.scenes - n_group), ("group", n_group)):
        taken = held_out | set(scenes)  # a one-shape scene is of both styles
        pool = make_scenes(n + len(taken), 10_000 + cfg.seed, style=style)
        scenes += [s for s in pool if s not in taken][:n]
    return scenes


def align_words(scene: Scene) -> list[str | tuple[str, str]]:
    """The words the 10 image tokens stand for: CLS -> number word, cell c -> (colour, kind) or ``nothing``."""
    words: list[str | tuple[str, str]] = [NUMBER_WORDS[len(scene.shapes)]] + [EMPTY_WORD] * GRID**2
    for s in scene.shapes:
        words[1 + s.cell] = (s.color, s.kind)
    return words


def align_targets(scenes: Sequence[Scene], embed: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """(B, 10, D) targets: rows of ``embed`` (V, D) for `` word`` (pairs averaged)."""
    rows: dict[str, torch.Tensor] = {}

    def row(word: str) -> torch.Tensor:
        if word not in rows:
            ids = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"target word {word!r} is {len(ids)} tokens; the recipe needs one-token words")
            rows[word] = embed[ids[0]]
        return rows[word]

    def vec(item: str | tuple[str, str]) -> torch.Tensor:
        return row(item) if isinstance(item, str) else torch.stack([row(w) for w in item]).mean(0)

    return torch.stack([torch.stack([vec(w) for w in align_words(scene)]) for scene in scenes])


def pixel_values(processor: Any, scenes: Sequence[Scene]) -> torch.Tensor:
    """(B, 3, 96, 96) processor pixels of the rendered scenes."""
    return processor.image_processor([render_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]


def align_loss(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error of image tokens (B, T, D) to targets (B, T, D), relative to the targets' mean square."""
    return (tokens - targets).pow(2).mean() / targets.pow(2).mean()


def cosine_lr(step: int, total: int, peak: float, warmup: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine to 0."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train(model: Any, processor: Any, cfg: RecipeConfig, log: Any = print) -> dict[str, Any]:
    """Train ``model.model.vision_tower`` + ``multi_modal_projector`` in place; the LM stays frozen.

    Returns the record of the run: the recipe, seconds, first/final loss and every step's loss.
    """
    torch.set_num_threads(cfg.threads)
    inner = model.model
    embed = inner.language_model.embed_tokens.weight.detach()
    params = [p for m in (inner.vision_tower, inner.multi_modal_projector) for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scenes = training_scenes(cfg)
    rng = random.Random(f"demo_vlm:{cfg.seed}")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        batch = rng.sample(scenes, cfg.batch)
        features = inner.get_image_features(pixel_values=pixel_values(processor, batch)).pooler_output
        loss = align_loss(torch.stack(list(features)), align_targets(batch, embed, processor.tokenizer))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({time.perf_counter() - start:.0f}s)")
    for p in params:
        p.requires_grad_(False)
    tail = losses[-50:]
    return {"recipe": asdict(cfg), "seconds": round(time.perf_counter() - start, 1), "first_loss": losses[0],
            "final_loss": sum(tail) / len(tail), "losses": [round(x, 5) for x in losses]}
