"""Stage 2 — train a student against the cached teacher states (never loading demonstrations).

load config -> set up (store, task, model, student, data, optimiser; resume from a checkpoint) ->
run (L = L_align + lambda L_gt, AdamW + cosine warm-up, clip, accumulation; ranks, mixed precision and
trackers through an accelerate.Accelerator) ->
save (adapter, train_log.jsonl, loss curve PNG, the exact config).

``--online`` runs the teacher every step instead of reading the store (the official code's way;
the comparison point for the offline design); everything else is shared.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import UserError, config_to_dict
from pipeline.locks import held_on_rank0
from pipeline.methods import get_method
from pipeline.plots import plot_losses
from pipeline.provenance import default_epochs, resolve
from pipeline.rundir import OutputLog, RunDir
from pipeline.runtime import Loaded, barrier, dist_info, load_for_stage
from pipeline.settings import TrainConfig
from pipeline.store import open_store, store_identity, store_settings
from pipeline.students import new_student
from pipeline.tasks import load_task
from stages.fitting import Fitter
from stages.trainer import Trainer, check_tracker
from stages.training import StudentData, steps_per_epoch


def default_align(config: TrainConfig) -> str:
    return config.align if config.align is not None else get_method(config.method).default_align


def run_name(config: TrainConfig, store_attrs: dict) -> str:
    if config.name:
        return config.name
    base = Path(config.cache).stem if config.cache else store_attrs.get("task", "online")
    tag = config.method + (f"-{config.variant}" if config.method == "mimic" and config.variant != "mimic" else "")
    return f"{base}-{tag}" + ("-online" if config.online else "")


def check_model_matches(attrs: dict, loaded: Loaded, force: bool) -> None:
    """Refuse a model other than the store's (shapes always; fingerprint unless --force)."""
    g = loaded.geometry
    if (attrs["layers"], attrs["hidden"]) != (g.num_layers, g.hidden_size):
        raise UserError(
            f"the store holds {attrs['layers']} layers x {attrs['hidden']} hidden states of {attrs['model']}, "
            f"but {loaded.source.alias} has {g.num_layers} x {g.hidden_size}"
        )
    if attrs.get("model_fingerprint") != loaded.source.fingerprint and not force:
        raise UserError(
            f"the store was made with {attrs['model']} (fingerprint {attrs.get('model_fingerprint')}), the model "
            f"loaded is {loaded.source.alias} ({loaded.source.fingerprint}); pass --force to train anyway"
        )


def setup(config: TrainConfig, loaded: Loaded | None = None) -> Trainer | Fitter:
    """Everything the loop needs; resumes from ``runs/<name>/checkpoint`` when present."""
    get_method(config.method)  # an unknown method is refused before anything loads
    check_tracker(config.report_to)  # so is a tracker whose package is missing
    if config.cache is None and not (config.online and config.task):
        raise UserError("give --cache STORE (or --online with --task)")
    if config.cache is None and config.shots is None:
        raise UserError("--online without a store needs --shots N (the teacher's demonstrations per query); "
                        "a 0-shot teacher would teach nothing")
    attrs: dict[str, Any] = {}
    if config.cache:
        store = open_store(config.cache)
        # every chunk read and its checksum checked before step 1: a damaged store must never become
        # silently wrong teacher states (a lost shard reads back as zeros)
        store.verify(full=True)
        attrs = store.attrs
    # the store's task is not an option's default but fixed: resolved without --task, then compared with it
    prov = resolve(model=config.model, data_root=config.data_root, records=[attrs] if attrs else [], what="the store")
    if attrs and config.task not in (None, prov.task):
        raise UserError(f"--task {config.task} differs from the store's task {prov.task}: a store fixes its task; "
                        "drop --task, or cache a store of that task with `pipeline teacher-cache`")
    if prov.model is None:
        raise UserError("--online without a store needs --model (the teacher's and the student's model)")
    model_name, task_name, data_root = prov.model, prov.task or config.task, prov.data_root
    task = load_task(task_name, **({"data_root": data_root} if data_root else {}))
    if loaded is None:
        loaded = load_for_stage(model_name, config.device, config.dtype, config.revision, config.trust_remote_code)
    if attrs:
        check_model_matches(attrs, loaded, config.force)
        if attrs.get("prompt_template") != task.spec.prompt_id:
            raise UserError(f"the store's prompt template {attrs.get('prompt_template')!r} differs from the "
                            f"task's {task.spec.prompt_id!r}; re-run teacher-cache")
    align = default_align(config)
    if align == "kl" and attrs and not attrs.get("topk"):
        raise UserError("the kl alignment needs teacher logits: re-run teacher-cache with --topk 20")
    data = StudentData(config, task, loaded, attrs, store_path=config.cache)
    epochs, source = training_epochs(config, model_name, len(data))
    # the run records (config.yaml) and compares (checkpoint) the values used, not "default"
    config = replace(config, lr=config.lr if config.lr is not None else get_method(config.method).default_lr, align=align,
                     epochs=epochs, model=model_name)
    name = run_name(config, attrs)
    run_dir = Path(config.runs_dir) / name
    info = {"base_model": loaded.source.recorded, "base_revision": loaded.source.revision,
            "base_fingerprint": loaded.source.fingerprint, "store_fingerprint": store_settings(attrs)}
    spec = get_method(config.method)
    if spec.fit is not None:
        if config.online or not attrs:
            raise UserError(f"--method {config.method} is fitted from a teacher store's queries and demonstrations: "
                            "give --cache STORE (not --online)")
        if config.mixed_precision != "no":  # the fit's forwards are not autocast: the run must not record it
            raise UserError(f"--method {config.method} is fitted in the model's precision, without a training loop: "
                            "drop --mixed-precision")
        return Fitter(replace(config, epochs=0), loaded, data, run_dir, task, spec, info)
    torch.manual_seed(config.seed)
    student = new_student(config.method, config.variant, loaded.model, loaded.geometry, **info)
    try:
        trainer = Trainer(config, loaded, student, data, run_dir, epochs, align)
    except BaseException:
        student.detach()  # a refused setting (e.g. --mixed-precision) leaves the model as it came
        raise
    trainer.stats["epochs_from"] = source
    return trainer


def training_epochs(config: TrainConfig, model: str, n_samples: int) -> tuple[int, str]:
    """(epochs, where they came from): ``--epochs``; else the model's epochs (pipeline/configs/models),
    raised to reach ``--min-steps`` optimiser steps when the data is small. 40 queries at batch 2 x 2 are
    10 steps an epoch: the model's 5 epochs (50 steps) left MimIC's loss still falling on such tasks."""
    if config.epochs is not None:
        return config.epochs, "--epochs"
    base = default_epochs(model)
    per_epoch = steps_per_epoch(n_samples, config, dist_info()[1])
    needed = math.ceil(config.min_steps / per_epoch) if config.min_steps else 0
    if needed > base:
        return needed, f"--min-steps {config.min_steps} ({per_epoch} steps an epoch; the model's {base} epochs give {base * per_epoch})"
    return base, f"the model's default ({model})"


def save_outputs(trainer: Trainer | Fitter) -> Path:
    run = RunDir(trainer.run_dir)
    trainer.student.save(run.path)
    run.write_config(config_to_dict(trainer.config))
    plot_losses(run.log_path, run.curve_path)
    return run.path


def run(config: TrainConfig, loaded: Loaded | None = None, show_progress: bool = True) -> Path:
    """Train (or resume) a student; returns the run directory. Rank 0 copies what the command prints into
    ``runs/<name>/train.log`` (``pipeline.rundir.OutputLog``: held from the start, written once the run
    directory is checked, so a refused run writes nothing)."""
    with OutputLog(enabled=dist_info()[0] == 0) as output:
        return _run(config, loaded, show_progress, output)


def _run(config: TrainConfig, loaded: Loaded | None, show_progress: bool, output: OutputLog) -> Path:
    rank, world, _ = dist_info()
    trainer = setup(config, loaded)
    try:
        run = RunDir(trainer.run_dir)
        with held_on_rank0(run.lock(), rank, world):
            store = trainer.data.store_attrs
            checkpoint = run.checkpoint({**config_to_dict(trainer.config), "store": store_identity(store)})
            if rank == 0:
                checkpoint.check_config(config.overwrite)
                output.attach(run.output_log_path)  # after --overwrite removed the old one
            barrier()  # no rank reads the checkpoint while rank 0 may still be removing it
            if show_progress and rank == 0:
                print(trainer.start_message())
            trainer.train(checkpoint, show_progress=show_progress and rank == 0)
            if rank == 0:
                finish(trainer, show_progress, world)
    finally:
        if trainer.student is not None:
            trainer.student.detach()  # a model passed in leaves as it came
    return trainer.run_dir


def finish(trainer: Trainer | Fitter, show_progress: bool, world: int) -> None:
    """Write the adapter, config, loss curve and summary; say what was done."""
    save_outputs(trainer)
    summary = trainer.summary()
    RunDir(trainer.run_dir).write_summary(summary)
    if not show_progress:
        return
    if isinstance(trainer, Fitter):
        print(trainer.done_message(summary))
        return
    if trainer.stats["resumed_at"] >= trainer.total_steps:
        print(f"{trainer.run_dir} is already trained ({summary['steps']} steps, final loss "
              f"{summary['final_loss']:.4g}); nothing to do (pass --overwrite to train it again)")
        return
    print(f"wrote {trainer.run_dir}: {summary['steps']} steps, final loss {summary['final_loss']:.4g}, "
          f"{summary['samples_per_s']:.2f} samples/s with {world} process{'es' if world > 1 else ''}")
    falling = still_falling([row["loss"] for row in RunDir(trainer.run_dir).read_log()])
    if falling:
        print(f"warning: {falling}; the student may be undertrained: train longer (--epochs, or a larger "
              "--min-steps) and compare")


FALLING_WINDOW, FALLING_DROP = 0.1, 0.1
"""``still_falling`` compares the mean loss of the last 10% of steps with the 10% before them; a drop of
more than 10% means the run stopped while still improving."""


def still_falling(losses: list[float]) -> str | None:
    """Why the loss curve looks unfinished (the last window's mean more than ``FALLING_DROP`` below the one
    before), or None. Needs at least 20 steps; non-finite losses are left out."""
    values = [v for v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
    width = max(1, int(len(values) * FALLING_WINDOW))
    if len(values) < 20:
        return None
    before, last = values[-2 * width : -width], values[-width:]
    a, b = sum(before) / len(before), sum(last) / len(last)
    if a > 0 and (a - b) / a > FALLING_DROP:
        return (f"the loss was still falling at the end ({a:.4g} -> {b:.4g}, -{100 * (a - b) / a:.0f}% over the "
                f"last {width} steps)")
    return None
