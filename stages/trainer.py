"""The optimisation loop of stage 2: one step = ``grad_accum`` micro-batches, then AdamW."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from pipeline.capture import StateCapture
from pipeline.config import UserError
from pipeline.forward import TeacherRunner, forward_states, pad_states
from pipeline.losses import align_l2sum, align_mse, answer_ce, gather_positions, kl_topk
from pipeline.methods import get_method
from pipeline.rundir import Checkpoint, RunDir
from pipeline.runtime import Loaded, Progress, dist_info
from stages.training import Item, StudentData, collate_items, steps_per_epoch


class Trainer:
    """Holds model, student, data and schedule; ``train`` runs or resumes the loop."""

    def __init__(self, config: Any, loaded: Loaded, student: Any, data: StudentData, run_dir: Path,
                 epochs: int, align: str):
        self.config, self.loaded, self.student, self.data = config, loaded, student, data
        self.run_dir, self.epochs, self.align = run_dir, epochs, align
        self.rank, self.world, _ = dist_info()
        self.capture = StateCapture(loaded.model, data.layer_target)
        self.teacher = None
        if config.online:
            self.teacher = TeacherRunner(loaded, data.layer_target, topk=20 if align == "kl" else 0,
                                         batch_size=config.batch_size)
        self.steps_per_epoch = steps_per_epoch(len(data), config, self.world)
        total = self.steps_per_epoch * epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.stats = {"samples": 0, "data_s": 0.0, "compute_s": 0.0, "final_loss": float("nan"), "steps": 0}

    def start_message(self) -> str:
        return (f"training {self.total_steps} steps: {self.epochs} epochs of {self.steps_per_epoch} "
                f"(epochs from {self.stats['epochs_from']})")

    # ---- data order -------------------------------------------------------------------------
    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of one epoch, grouped per optimiser step (seeded shuffle)."""
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        order = torch.randperm(len(self.data), generator=g).tolist()
        # every rank must take the same number of steps (all-reduce): pad as DistributedSampler does
        order += order[: (-len(order)) % self.world]
        order = order[self.rank :: self.world]
        bs, acc = self.config.batch_size, self.config.grad_accum
        micro = [order[i : i + bs] for i in range(0, len(order), bs)]
        return [micro[i : i + acc] for i in range(0, len(micro), acc)]

    # ---- one micro-batch --------------------------------------------------------------------
    def targets(self, items: list[Item], epoch: int) -> tuple[list[torch.Tensor], list | None]:
        if self.teacher is None:
            return [it.hs for it in items], [it.topk for it in items] if items[0].topk is not None else None
        with self.student.disabled():
            outs = self.teacher.forward(self.data.teacher_prompts(items, epoch), to_cpu=False)
        topk = [(v, i) for _, v, i in outs] if outs[0][1] is not None else None
        return [hs for hs, _, _ in outs], topk

    def micro_loss(self, items: list[Item], epoch: int) -> tuple[torch.Tensor, dict]:
        """L = L_align + lambda L_gt on one micro-batch (right-padded)."""
        dev = self.loaded.device
        prompts = [it.prompt for it in items]
        lengths = [len(p.encoded) for p in prompts]
        starts = [p.span_start for p in prompts]
        hs, topk = self.targets(items, epoch)
        run = forward_states(self.loaded, self.capture, prompts)
        out, batch, states, pos, mask = run.output, run.batch, run.states, run.positions, run.mask
        width = pos.shape[1]
        tmask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        first = [p.answer_start if self.config.ce_tokens == "answer" else 1 for p in prompts]
        for b, (f, n) in enumerate(zip(first, lengths, strict=True)):
            tmask[b, f:n] = True
        gt = answer_ce(out.logits, batch["input_ids"], tmask)
        parts = {"gt": gt}
        if self.align in ("mse", "l2sum"):
            teacher = pad_states([h.to(dev) for h in hs], width)
            fn = align_mse if self.align == "mse" else align_l2sum
            parts["align"] = fn(states, teacher, mask)
        elif self.align == "kl":
            tv = pad_states([v.to(dev) for v, _ in topk], width)
            ti = pad_states([i.to(dev) for _, i in topk], width)
            # span position j predicts token span_start + j + 1: keep the j that predict answer tokens
            j = torch.arange(width, device=dev)[None]
            lo = torch.tensor([p.answer_start - p.span_start - 1 for p in prompts], device=dev)[:, None]
            hi = torch.tensor([n - s - 1 for n, s in zip(lengths, starts, strict=True)], device=dev)[:, None]
            parts["align"] = kl_topk(gather_positions(out.logits, pos), tv, ti, (j >= lo) & (j < hi))
        align = parts.get("align")
        loss = gt if align is None else align + self.config.lambda_gt * gt
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    # ---- the loop ---------------------------------------------------------------------------
    def optimiser(self) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over one (decay, no-decay on biases) pair of groups per learning rate: one pair unless
        the method gives its parts their own (``MethodSpec.param_lr``, e.g. mimic-lora)."""
        named = self.student.trainable()
        lr_of = get_method(self.config.method).param_lr
        rates = [self.config.lr if lr_of is None else lr_of(self.config, self.config.lr, n) for n, _ in named]
        groups = []
        for lr in dict.fromkeys(rates):  # in order of first use: the first group's lr is the one logged
            part = [(n, p) for (n, p), r in zip(named, rates, strict=True) if r == lr]
            for decay in (True, False):  # no weight decay on biases
                groups.append({"params": [p for n, p in part if n.endswith("bias") != decay], "lr": lr,
                               "weight_decay": self.config.weight_decay if decay else 0.0})
        opt = torch.optim.AdamW(groups, lr=self.config.lr)
        warmup = math.ceil(self.config.warmup_ratio * self.total_steps)
        return opt, get_cosine_schedule_with_warmup(opt, warmup, self.total_steps)

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """The logged loss parts of a step, averaged over ranks (what one process would log)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.loaded.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def train(self, checkpoint: Checkpoint, show_progress: bool = True) -> None:
        opt, sched = self.optimiser()
        params = [p for _, p in self.student.trainable()]
        step = 0
        state = checkpoint.load()
        if state is not None:
            self.student.load_tensors({k: v.to(self.loaded.device) for k, v in state["tensors"].items()})
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            step = state["step"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run = RunDir(self.run_dir)
        keep = run.read_log(upto=step)  # steps after the checkpoint are trained again
        if self.rank == 0:  # the one writer of the log
            run.rewrite_log(keep)
        log_path = run.log_path
        # a resumed run reports the loss it reached, even when nothing is left to train
        self.stats.update(resumed_at=step, steps=step, final_loss=keep[-1]["loss"] if keep else float("nan"))
        progress = Progress(self.total_steps - step, f"train-student {self.run_dir.name}", show_progress, unit="step")
        start = time.perf_counter()
        with log_path.open("a") as log:
            for epoch in range(self.epochs):
                groups = self.epoch_groups(epoch)
                first = max(0, step - epoch * self.steps_per_epoch)
                todo = groups[first : first + max(0, self.total_steps - step)]
                if not todo:
                    continue
                batches = iter(self.loader([m for g in todo for m in g]))
                for group in todo:
                    waited = time.perf_counter()
                    micro_batches = [next(batches) for _ in group]  # the device waits for these
                    self.stats["data_s"] += time.perf_counter() - waited
                    row = self.step(micro_batches, epoch, opt, sched, params)
                    step += 1
                    row.update(step=step, epoch=epoch, samples_per_s=self.stats["samples"] / (time.perf_counter() - start))
                    if not math.isfinite(row["loss"]):
                        kept = (f"the last good checkpoint is kept in {checkpoint.dir}" if checkpoint.exists else
                                f"no checkpoint was written yet (every {self.config.checkpoint_every} steps)")
                        raise UserError(f"loss became {row['loss']} at step {step}; {kept} — lower --lr or check "
                                        "the store (`pipeline teacher-cache` re-run with --overwrite)")
                    if self.rank == 0:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    progress.update(1, samples=sum(len(m) for m in group), loss=f"{row['loss']:.4g}")
                    self.stats["final_loss"], self.stats["steps"] = row["loss"], step
                    if self.rank == 0 and (step % self.config.checkpoint_every == 0 or step == self.total_steps):
                        checkpoint.save(self.student.tensors(), opt, sched, step)
        self.stats["elapsed_s"] = progress.close()
        self.stats["steps"] = max(self.stats["steps"], step)

    def loader(self, micro_batches: list[list[int]]) -> torch.utils.data.DataLoader:
        """Reads (store, images, tokenisation) in ``num_workers`` processes while the device computes."""
        return torch.utils.data.DataLoader(
            self.data, batch_sampler=micro_batches, collate_fn=collate_items, num_workers=self.config.num_workers,
            prefetch_factor=4 if self.config.num_workers else None,
        )

    def step(self, group: list[list[Item]], epoch: int, opt: Any, sched: Any, params: list) -> dict:
        """One optimiser step over the micro-batches of ``group`` (already loaded)."""
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {"loss": 0.0}
        n_micro = len(group)
        for items in group:
            t1 = time.perf_counter()
            loss, parts = self.micro_loss(items, epoch)
            (loss / n_micro).backward()
            self.stats["compute_s"] += time.perf_counter() - t1
            self.stats["samples"] += len(items)
            totals["loss"] += float(loss.detach()) / n_micro
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / n_micro
        self.all_reduce_grads(params)
        totals = self.mean_over_ranks(totals)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        return {**totals, "lr": lr, "grad_norm": float(grad_norm)}

    def summary(self) -> dict:
        s = self.stats
        elapsed = s.get("elapsed_s", 0.0) or 1e-9
        return {"steps": s["steps"], "final_loss": s["final_loss"], "training_queries": len(self.data),
                "samples_per_s": s["samples"] / elapsed if s["samples"] else None,
                "data_s": s["data_s"], "compute_s": s["compute_s"], "elapsed_s": elapsed, "align": self.align,
                "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "epochs_from": s.get("epochs_from", "--epochs")}
