"""Stage 2 — train a student against the cached teacher states (never loading demonstrations).

load config -> set up (store, task, model, student, data, optimiser; resume from a checkpoint) ->
run (L = L_align + lambda L_gt, AdamW + cosine warm-up, clip, accumulation, DDP by all-reduce) ->
save (adapter, train_log.jsonl, loss curve PNG, the exact config).

``--online`` runs the teacher every step instead of reading the store (the official code's way;
the comparison point for the offline design); everything else is shared.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import UserError, config_to_dict
from pipeline.locks import held_on_rank0
from pipeline.methods import get_method
from pipeline.plots import plot_losses
from pipeline.provenance import default_epochs, resolve
from pipeline.rundir import RunDir
from pipeline.runtime import Loaded, barrier, dist_info, load_for_stage
from pipeline.settings import TrainConfig
from pipeline.store import open_store, store_identity, store_settings
from pipeline.students import new_student
from pipeline.tasks import load_task
from stages.trainer import Trainer
from stages.training import StudentData


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


def setup(config: TrainConfig, loaded: Loaded | None = None) -> Trainer:
    """Everything the loop needs; resumes from ``runs/<name>/checkpoint`` when present."""
    get_method(config.method)  # an unknown method is refused before anything loads
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
    stored = resolve(records=[attrs] if attrs else [], what="the store")
    if attrs and config.task not in (None, stored.task):
        raise UserError(f"--task {config.task} differs from the store's task {stored.task}: a store fixes its task; "
                        "drop --task, or cache a store of that task with `pipeline teacher-cache`")
    prov = resolve(task=config.task, model=config.model, data_root=config.data_root, records=[attrs] if attrs else [],
                   what="the store")
    if prov.model is None:
        raise UserError("--online without a store needs --model (the teacher's and the student's model)")
    model_name, task_name, data_root = prov.model, prov.task, prov.data_root
    task = load_task(task_name, **({"data_root": data_root} if data_root else {}))
    if loaded is None:
        loaded = load_for_stage(model_name, config.device, config.dtype, config.revision, config.trust_remote_code)
    if attrs:
        check_model_matches(attrs, loaded, config.force)
        if attrs.get("prompt_template") != task.spec.prompt_id:
            raise UserError(f"the store's prompt template {attrs.get('prompt_template')!r} differs from the "
                            f"task's {task.spec.prompt_id!r}; re-run teacher-cache")
    align = default_align(config)
    epochs = config.epochs or default_epochs(model_name)
    # the run records (config.yaml) and compares (checkpoint) the values used, not "default"
    config = replace(config, lr=config.lr if config.lr is not None else get_method(config.method).default_lr, align=align,
                     epochs=epochs, model=model_name)
    if align == "kl" and attrs and not attrs.get("topk"):
        raise UserError("the kl alignment needs teacher logits: re-run teacher-cache with --topk 20")
    name = run_name(config, attrs)
    run_dir = Path(config.runs_dir) / name
    torch.manual_seed(config.seed)
    student = new_student(
        config.method, config.variant, loaded.model, loaded.geometry, base_model=loaded.source.recorded,
        base_revision=loaded.source.revision, base_fingerprint=loaded.source.fingerprint,
        store_fingerprint=store_settings(attrs),
    )
    data = StudentData(config, task, loaded, attrs, store_path=config.cache)
    return Trainer(config, loaded, student, data, run_dir, epochs, align)


def save_outputs(trainer: Trainer) -> Path:
    run = RunDir(trainer.run_dir)
    trainer.student.save(run.path)
    run.write_config(config_to_dict(trainer.config))
    plot_losses(run.log_path, run.curve_path)
    return run.path


def run(config: TrainConfig, loaded: Loaded | None = None, show_progress: bool = True) -> Path:
    """Train (or resume) a student; returns the run directory."""
    rank, world, _ = dist_info()
    trainer = setup(config, loaded)
    try:
        run = RunDir(trainer.run_dir)
        with held_on_rank0(run.lock(), rank, world):
            store = trainer.data.store_attrs
            checkpoint = run.checkpoint({**config_to_dict(trainer.config), "store": store_identity(store)})
            if rank == 0:
                checkpoint.check_config(config.overwrite)
            barrier()  # no rank reads the checkpoint while rank 0 may still be removing it
            trainer.train(checkpoint, show_progress=show_progress and rank == 0)
            if rank == 0:
                finish(trainer, show_progress, world)
    finally:
        trainer.student.detach()  # a model passed in leaves as it came
    return trainer.run_dir


def finish(trainer: Trainer, show_progress: bool, world: int) -> None:
    """Write the adapter, config, loss curve and summary; say what was done."""
    save_outputs(trainer)
    summary = trainer.summary()
    RunDir(trainer.run_dir).write_summary(summary)
    if not show_progress:
        return
    if trainer.stats["resumed_at"] >= trainer.total_steps:
        print(f"{trainer.run_dir} is already trained ({summary['steps']} steps, final loss "
              f"{summary['final_loss']:.4g}); nothing to do (pass --overwrite to train it again)")
        return
    print(f"wrote {trainer.run_dir}: {summary['steps']} steps, final loss {summary['final_loss']:.4g}, "
          f"{summary['samples_per_s']:.2f} samples/s with {world} process{'es' if world > 1 else ''}")
