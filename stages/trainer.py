"""The optimisation loop of stage 2: one step = ``grad_accum`` micro-batches, then AdamW.

It runs on an ``accelerate.Accelerator`` (docs/architecture.md §5): ranks and the data shards, backward with
mixed precision, the mean of the ranks' gradients, gradient clipping and the experiment trackers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import DistributedType
from transformers import get_cosine_schedule_with_warmup

from pipeline.capture import StateCapture
from pipeline.config import UserError
from pipeline.decoding import compile_fn, compiler_error, forward_replaced, wants_compile
from pipeline.forward import TeacherRunner, forward_states, pad_states
from pipeline.losses import align_l2sum, align_mse, answer_ce, gather_positions, kl_topk
from pipeline.methods import get_method
from pipeline.rundir import Checkpoint, RunDir
from pipeline.runtime import Loaded, Progress, loader_workers, make_accelerator
from stages.training import Item, StudentCollate, StudentData, steps_per_epoch

AUTO_COMPILE_STEPS = 2500
"""train-student --compile auto compiles from this many optimiser steps on: compiling the student's forward and
backward took ~2 min on the H200 and saves ~84 ms per step (bench/model_overhead.py, docs/benchmarks.md)."""

TRACKED = ("loss", "align", "gt", "lr", "grad_norm", "samples_per_s")
"""The values of a step's log row that ``--report-to`` sends to the tracker, as ``train/<key>``."""
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
"""``runs/<name>/tensorboard/``: the event files of ``--report-to tensorboard``."""
WANDB_PROJECT = "mimic-pipeline"
UNSUPPORTED = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
               DistributedType.MEGATRON_LM: "Megatron-LM", DistributedType.XLA: "XLA"}


WORKER_NICENESS = 5
"""How much lower the CPU priority of train-student's loader workers is than the training process's."""


def yield_cpu(_worker_id: int) -> None:
    """A loader worker's first act: lower its CPU priority by ``WORKER_NICENESS``. Why: on a GPU the student
    step is bound by the host (one Python thread issuing ~6,100 kernels a step, the device busy ~38% of it),
    and while 8 workers filled their queues the first ~10 steps of an epoch took 0.6-0.8 s instead of
    0.23 s on the H200. Measured once with and once without (docs/benchmarks.md, fifth round): the slow start
    of 8 workers went from 4.7 s to 4.1 s above the steady steps, the steady step from 0.233 to 0.201 s;
    within run-to-run noise, so not shown to help, kept as harmless. Where the system refuses, the worker
    goes on as it is."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is missing (accelerate would only warn and train without it)."""
    package = TRACKER_PACKAGES.get(report_to)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise UserError(f"--report-to {report_to} needs the {package} package: pip install {package}") from err


def plain_values(config: dict) -> dict:
    """A run's options as a tracker stores them (numbers, strings and booleans; anything else as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


class Trainer:
    """Holds model, student, data and schedule; ``train`` runs or resumes the loop."""

    def __init__(self, config: Any, loaded: Loaded, student: Any, data: StudentData, run_dir: Path,
                 epochs: int, align: str):
        self.config, self.loaded, self.student, self.data = config, loaded, student, data
        self.run_dir, self.epochs, self.align = run_dir, epochs, align
        self.accelerator = self.make_accelerator(config, loaded, run_dir)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.capture = StateCapture(loaded.model, data.layer_target)
        self.teacher = None
        if config.online:
            self.teacher = TeacherRunner(loaded, data.layer_target, topk=20 if align == "kl" else 0,
                                         batch_size=config.batch_size)
        self.steps_per_epoch = steps_per_epoch(len(data), config, self.world)
        total = self.steps_per_epoch * epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.stats = {"samples": 0, "data_s": 0.0, "compute_s": 0.0, "final_loss": float("nan"), "steps": 0}
        # --compile: the student's forward through torch.compile (``compiled_forward``); off for the rest of
        # the run after a compiler failure
        self.compile = wants_compile(config.compile, loaded.device, self.total_steps, AUTO_COMPILE_STEPS)
        self.compiled_calls = 0  # forwards that went through the compiled function
        self._compiled: Callable | None = None
        self._checked = False  # a student forward ran eagerly (see ``compiled_forward``)

    @staticmethod
    def make_accelerator(config: Any, loaded: Loaded, run_dir: Path) -> Any:
        """The run's Accelerator (``--mixed-precision``, ``--report-to``); refuses what it would not do as asked."""
        check_tracker(config.report_to)
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # `accelerate launch --mixed_precision` / its config
        if launched not in (None, "no", config.mixed_precision):
            fix = (f"give --mixed-precision {launched} to train-student (the run records it)"
                   if launched in ("fp16", "bf16") else "train-student autocasts in no, fp16 or bf16 only")
            raise UserError(f"accelerate launch asks for mixed precision {launched} but train-student has "
                            f"--mixed-precision {config.mixed_precision}: {fix}")
        acc = make_accelerator(config.mixed_precision, None if config.report_to == "none" else config.report_to,
                               run_dir)
        if acc.distributed_type in UNSUPPORTED:
            raise UserError(f"train-student does not run under {UNSUPPORTED[acc.distributed_type]}: the base model is "
                            "frozen and each process holds a copy, only the student's gradients are averaged; use "
                            "an accelerate config of one or several processes (multi-GPU or multi-CPU) without it")
        if config.mixed_precision == "fp16" and (acc.scaler is None or loaded.device.type != "cuda"):
            raise UserError("--mixed-precision fp16 needs a GPU (accelerate does no float16 autocast on a CPU, the "
                            "run would silently be full precision): use bf16 on a CPU")
        return acc

    def start_message(self) -> str:
        return (f"training {self.total_steps} steps: {self.epochs} epochs of {self.steps_per_epoch} "
                f"(epochs from {self.stats['epochs_from']})")

    # ---- data order -------------------------------------------------------------------------
    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of one epoch, grouped per optimiser step (seeded shuffle). The samples are
        dealt to the ranks one at a time by accelerate's shard (rank r gets r, r + W, ...; the last ones padded
        from the start, so that every rank takes the same number of steps and none waits in a collective);
        each rank then cuts its share into micro-batches, so one rank's are exactly one process's."""
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        order = torch.randperm(len(self.data), generator=g).tolist()
        shard = BatchSamplerShard(torch.utils.data.BatchSampler(order, 1, drop_last=False), self.world, self.rank)
        order = [i for (i,) in shard]
        bs, acc = self.config.batch_size, self.config.grad_accum
        micro = [order[i : i + bs] for i in range(0, len(order), bs)]
        return [micro[i : i + acc] for i in range(0, len(micro), acc)]

    # ---- one micro-batch --------------------------------------------------------------------
    def targets(self, items: list[Item], epoch: int) -> tuple[list[torch.Tensor] | torch.Tensor, list | None]:
        """The teacher's states of a micro-batch (a list per item, or already padded: ``MicroBatch.teacher``)
        and its top-k log-probs: read from the store, or ``--online`` from a teacher forward."""
        if self.teacher is None:
            topk = [it.topk for it in items] if items[0].topk is not None else None
            padded = getattr(items, "teacher", None)
            return (padded if padded is not None else [it.hs for it in items]), topk
        with self.student.disabled():
            outs = self.teacher.forward(self.data.teacher_prompts(items, epoch), to_cpu=False)
        topk = [(v, i) for _, v, i in outs] if outs[0][1] is not None else None
        return [hs for hs, _, _ in outs], topk

    def micro_loss(self, items: list[Item], epoch: int) -> tuple[torch.Tensor, dict]:
        """L = L_align + lambda L_gt on one micro-batch (right-padded)."""
        hs, topk = self.targets(items, epoch)
        with self.autocast():  # --mixed-precision: the student's forward and its losses
            return self.student_loss([it.prompt for it in items], hs, topk, getattr(items, "batch", None))

    def autocast(self) -> Any:
        """The Accelerator's autocast, on the device the model is on: a model kept on the CPU of a machine with a
        GPU (--device cpu) autocasts bf16 on the CPU, where the Accelerator's own would target the GPU."""
        if self.config.mixed_precision == "no" or self.accelerator.device.type == self.loaded.device.type:
            return self.accelerator.autocast()
        return torch.autocast(self.loaded.device.type, dtype=torch.bfloat16)  # fp16 off the GPU is refused above

    @contextlib.contextmanager
    def compiled_forward(self) -> Iterator[None]:
        """``model.forward`` through ``torch.compile`` while the block runs (``--compile``), else unchanged.

        Why: on a GPU each eager op costs 20-50 us of host time and MimIC adds ~30 small ops per layer, so an
        eager student step is host-bound; compiled, they fuse (Idefics2-8B shape, H200, B8/T82, gradients set to
        None each step as here: MimIC forward+backward 135.4 ms eager, 68.7 ms compiled, against stock's 107.0 /
        64.2 ms; bench/model_overhead.py, docs/benchmarks.md eighth round). Default mode (no CUDA graphs:
        every step's activations are kept for the backward) and automatic dynamic shapes: the first padded
        length compiles a static graph, the next a dynamic one that serves every later length. Only the student's forward: the teacher's (``--online``) runs
        under inference mode with the student switched off, eagerly. The first student forward is eager
        too: the student's one-time check that every layer called its attention function is a hook that
        removes itself, which dynamo cannot trace (it would run the model's forward uncompiled from then on)."""
        if not (self.compile and self._checked):
            yield
            self._checked = True
            return
        model = self.loaded.model
        if self._compiled is None:
            # graph breaks (a VLM's vision tower selects its real images by value) make several frames of
            # transformers' shared decorators, each static then dynamic: compile_fn raises the recompile limit
            self._compiled = compile_fn(model.forward)

        def compiled(*args: Any, **kwargs: Any) -> Any:
            self.compiled_calls += 1
            return self._compiled(*args, **kwargs)

        with forward_replaced(model, compiled):
            yield

    def student_loss(self, prompts: list, hs: list[torch.Tensor] | torch.Tensor, topk: list | None,
                     batch: dict | None = None) -> tuple[torch.Tensor, dict]:
        """``hs``: the teacher's states per prompt, or zero-padded to the span width; ``batch``: the prompts
        collated (right padding), else collated here."""
        dev = self.loaded.device
        lengths = [len(p.encoded) for p in prompts]
        starts = [p.span_start for p in prompts]
        with self.compiled_forward():
            run = forward_states(self.loaded, self.capture, prompts, batch)
        out, batch, states, pos, mask = run.output, run.batch, run.states, run.positions, run.mask
        width = pos.shape[1]
        tmask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        first = [p.answer_start if self.config.ce_tokens == "answer" else 1 for p in prompts]
        for b, (f, n) in enumerate(zip(first, lengths, strict=True)):
            tmask[b, f:n] = True
        gt = answer_ce(out.logits, batch["input_ids"], tmask)
        parts = {"gt": gt}
        if self.align in ("mse", "l2sum"):
            teacher = (hs.to(dev, non_blocking=True) if torch.is_tensor(hs)
                       else pad_states([h.to(dev) for h in hs], width))
            if teacher.shape[1] != width:
                raise RuntimeError(f"teacher states padded to {teacher.shape[1]} positions, the student's span has {width}")
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

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients over the ranks (``accelerator.reduce``), once per optimiser step.

        The model is not wrapped by ``accelerator.prepare`` (DDP): only the student's parameters train, well
        under 1% of the model, attached inside the frozen base. DDP would broadcast every base weight when
        wrapping, route each forward through the wrapper and all-reduce after every micro-batch unless told
        not to; here one all-reduce of the student's flattened gradients (per dtype) is all the sync there is."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:  # a part that got no gradient on this rank still takes part in the mean
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = self.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in group]), reduction="mean")
            for p, g in zip(group, flat.split([p.numel() for p in group]), strict=True):
                p.grad.copy_(g.view_as(p.grad))

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """The logged loss parts of a step, averaged over ranks (what one process would log): gathered."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        rows = self.accelerator.gather(t).reshape(self.world, len(keys))
        return {k: float(v) for k, v in zip(keys, (rows.sum(0) / self.world).tolist(), strict=True)}

    def start_trackers(self, step: int) -> None:
        """``--report-to``: start the tracker (rank 0), with the run's options as its configuration."""
        if self.config.report_to == "none":
            return
        from pipeline.config import config_to_dict

        kwargs = {
            # a resumed run trains the steps after its checkpoint again: TensorBoard drops what an earlier
            # invocation logged from there on (a fresh run, step 0, drops all of it: --overwrite)
            "tensorboard": {"purge_step": step + 1},
            "wandb": {"name": self.run_dir.name, "dir": str(self.run_dir)},
        }
        project = TENSORBOARD_DIR if self.config.report_to == "tensorboard" else WANDB_PROJECT
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.config.report_to == "tensorboard":
            # TensorBoard opens its event file in a thread of its own, which prints a traceback of a write
            # error before re-raising it here: a directory it cannot write is refused first
            events = self.run_dir / TENSORBOARD_DIR
            try:
                events.mkdir(exist_ok=True)
                tempfile.TemporaryFile(dir=events).close()
            except OSError as err:
                raise UserError(f"--report-to tensorboard cannot write its event files in {events} "
                                f"({err.strerror or err}); make it a writable directory, or use --report-to none") from err
        self.accelerator.init_trackers(project, plain_values(config_to_dict(self.config)), init_kwargs=kwargs)

    def stop_trackers(self) -> None:
        """Flush and close the trackers. Not ``accelerator.end_training``: it also destroys the process group,
        which the command still needs after the loop (the run directory's lock, the outputs)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def train(self, checkpoint: Checkpoint, show_progress: bool = True) -> None:
        opt, sched = self.optimiser()
        # prepared so that backward scales and clipping unscales the fp16 loss (GradScaler) and a step the
        # scaler skips is known; the student's tensors stay where they are. The scheduler is not prepared:
        # accelerate's steps it once per process per step, its total counted over one process's data, and
        # ``total_steps`` here is already each rank's.
        opt = self.accelerator.prepare_optimizer(opt, device_placement=False)
        scaler = self.accelerator.scaler
        params = [p for _, p in self.student.trainable()]
        step = 0
        state = checkpoint.load()
        if state is not None:
            self.student.load_tensors({k: v.to(self.loaded.device) for k, v in state["tensors"].items()})
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
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
        self.start_trackers(step)
        with log_path.open("a") as log, self.trackers_stopped():
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
                    self.accelerator.log({f"train/{k}": row[k] for k in TRACKED if k in row}, step=step)
                    progress.update(1, samples=sum(len(m) for m in group), loss=f"{row['loss']:.4g}")
                    self.stats["final_loss"], self.stats["steps"] = row["loss"], step
                    if self.rank == 0 and (step % self.config.checkpoint_every == 0 or step == self.total_steps):
                        extra = {"scaler": scaler.state_dict()} if scaler is not None else None
                        checkpoint.save(self.student.tensors(), opt, sched, step, extra)
        self.stats["elapsed_s"] = progress.close()
        self.stats["steps"] = max(self.stats["steps"], step)
        # what each rank trained in this invocation: the proof that the processes shared the work
        mine = torch.tensor([self.stats["samples"]], device=self.accelerator.device)
        self.stats["samples_per_rank"] = [int(n) for n in self.accelerator.gather(mine).tolist()]

    @contextlib.contextmanager
    def trackers_stopped(self) -> Iterator[None]:
        """Stop the trackers when the loop ends, also by an error (what was logged is flushed)."""
        try:
            yield
        finally:
            self.stop_trackers()

    @property
    def workers(self) -> int:
        """``--num-workers``, by default 4 on CUDA and 0 on the CPU (``loader_workers``)."""
        return loader_workers(self.config.num_workers, self.loaded.device)

    def loader(self, micro_batches: list[list[int]]) -> torch.utils.data.DataLoader:
        """Reads (store, images, tokenisation) in ``num_workers`` processes while the device computes; the
        workers run at a lower CPU priority (``yield_cpu``)."""
        return torch.utils.data.DataLoader(
            self.data, batch_sampler=micro_batches, collate_fn=StudentCollate(self.loaded.family, self.loaded.processor),
            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
            pin_memory=self.loaded.device.type == "cuda", worker_init_fn=yield_cpu if self.workers else None,
        )

    def step(self, group: list[list[Item]], epoch: int, opt: Any, sched: Any, params: list) -> dict:
        """One optimiser step over the micro-batches of ``group`` (already loaded)."""
        stats = dict(self.stats)
        try:
            totals = self.accumulate(group, epoch, opt)
        except Exception as err:  # a compiler failure must not lose a step: eager computes the same
            if not (self.compile and compiler_error(err)):
                raise
            self.compile = False
            reason = (str(err).splitlines() or [""])[0][:200]
            warnings.warn(f"compiled training forward failed ({type(err).__name__}: {reason}); training eagerly "
                          "from now on (--compile off skips the attempt)", stacklevel=2)
            self.stats = stats  # the step again from the start: no gradient or count of the failed attempt
            totals = self.accumulate(group, epoch, opt)
        self.sync_grads(params)
        totals = self.mean_over_ranks(totals)
        grad_norm = self.accelerator.clip_grad_norm_(params, self.config.grad_clip)
        opt.step()
        lr = sched.get_last_lr()[0]
        if not opt.step_was_skipped:  # fp16: an overflowing step changes nothing, the schedule included
            sched.step()
        return {**totals, "lr": lr, "grad_norm": float(grad_norm)}

    def accumulate(self, group: list[list[Item]], epoch: int, opt: Any) -> dict[str, float]:
        """Zeroed gradients, then forward and backward of every micro-batch of ``group``; the mean loss parts.
        A compiler error may come from the backward too (its graph compiles at the first backward)."""
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {"loss": 0.0}
        n_micro = len(group)  # an epoch's last step may have fewer than --grad-accum: divided here, not by accelerate
        for items in group:
            t1 = time.perf_counter()
            loss, parts = self.micro_loss(items, epoch)
            self.accelerator.backward(loss / n_micro)
            self.stats["compute_s"] += time.perf_counter() - t1
            self.stats["samples"] += len(items)
            totals["loss"] += float(loss.detach()) / n_micro
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / n_micro
        return totals

    def summary(self) -> dict:
        s = self.stats
        elapsed = s.get("elapsed_s", 0.0) or 1e-9
        return {"steps": s["steps"], "final_loss": s["final_loss"], "training_queries": len(self.data),
                "samples_per_s": s["samples"] / elapsed if s["samples"] else None,
                "data_s": s["data_s"], "compute_s": s["compute_s"], "elapsed_s": elapsed, "align": self.align,
                "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "epochs_from": s.get("epochs_from", "--epochs"), "processes": self.world,
                "samples_per_rank": s.get("samples_per_rank"), "mixed_precision": self.config.mixed_precision,
                "compiled": self.compiled_calls > 0 and self.compile}
