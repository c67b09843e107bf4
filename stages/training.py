"""Stage 2's data (store or online teacher prompts) and checkpoints."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import UserError
from pipeline.prompts import DemoCache, build_prompt, check_alignment
from pipeline.runtime import Loaded
from pipeline.store import open_store
from pipeline.tasks.sampling import sample_demonstrations

LOG_FILE = "train_log.jsonl"
# keys that may change between a run and its resumption
RESUMABLE_KEYS = ("max_steps", "num_workers", "checkpoint_every", "overwrite", "force", "device", "runs_dir", "name")


@dataclass
class Item:
    """One training sample: the student prompt and, offline, the cached teacher states."""

    index: int
    prompt: Any
    hs: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None


class StudentData(torch.utils.data.Dataset):
    """Student inputs rebuilt from the task's query (+ image); teacher states from the store."""

    def __init__(self, config: Any, task: Any, loaded: Loaded, attrs: dict, store_path: str | None):
        self.config, self.task, self.family, self.processor = config, task, loaded.family, loaded.processor
        self.store_path = store_path
        self.store_attrs = attrs  # the teacher store's attributes ({} online)
        self._store = None
        self.online = config.online
        self.demo_cache = DemoCache() if config.online else None  # teacher prompts are built in the main process
        if store_path:
            store = open_store(store_path)
            self.query_index = [int(q) for q in store.read_array("query_ids")]
            self.demos = [[int(d) for d in row if d >= 0] for row in store.read_array("icd_ids")]
            self.demo_seed, self.shots = int(attrs["demo_seed"]), int(attrs["shots"])
            self.layer_target = attrs["layer_target"]
        else:
            queries = task.split("train")
            self.query_index = list(range(min(config.n_queries, len(queries))))
            self.demo_seed, self.shots, self.layer_target = config.seed, config.shots or 0, config.layer_target
            self.demos = [self.sample_demos(i, 0) for i in range(len(self.query_index))]

    def __len__(self) -> int:
        return len(self.query_index)

    def sample_demos(self, i: int, epoch: int) -> list[int]:
        query = self.task.split("train")[self.query_index[i]]
        seed = self.demo_seed + (epoch if self.config.resample_demos else 0)
        return list(sample_demonstrations(self.task.split("support"), query, self.shots, seed)) if self.shots else []

    def __getitem__(self, i: int) -> Item:
        query = self.task.split("train")[self.query_index[i]]
        answer = self.task.demo_answer(query)
        prompt = build_prompt(self.family, self.processor, self.task.spec, query, [], [], answer)
        if self.online:
            return Item(i, prompt)
        if self._store is None:  # opened lazily, inside the DataLoader worker
            self._store = open_store(self.store_path)
        record = self._store.read(i)
        if prompt.encoded.input_ids[prompt.span_start :] != [int(t) for t in record.token_ids]:
            raise UserError(
                f"sample {i} (query {query.id}): the student's query+answer tokens differ from the store's; "
                "the task data or tokenizer changed since teacher-cache — re-run it"
            )
        topk = (record.topk_values, record.topk_indices) if record.topk_values is not None else None
        return Item(i, prompt, record.hs, topk)

    def teacher_prompts(self, items: list[Item], epoch: int) -> list[Any]:
        """--online: the k-shot teacher prompts of a batch (demonstrations per epoch)."""
        queries, support = self.task.split("train"), self.task.split("support")
        prompts = []
        for it in items:
            query = queries[self.query_index[it.index]]
            demo_ids = self.demos[it.index] if epoch == 0 or not self.config.resample_demos else self.sample_demos(it.index, epoch)
            demos = [support[j] for j in demo_ids]
            student = it.prompt  # same query and answer: its answer offset spares encoding the prompt alone
            teacher = build_prompt(self.family, self.processor, self.task.spec, query, demos,
                                   [self.task.demo_answer(d) for d in demos], self.task.demo_answer(query),
                                   self.demo_cache, answer_offset=student.answer_start - student.span_start)
            try:
                check_alignment(teacher, student, query.id)
            except ValueError as err:
                raise UserError(str(err)) from err
            prompts.append(teacher)
        return prompts


def collate_items(items: list[Item]) -> list[Item]:
    return items


# every file stage 2 writes into runs/<name>/; --overwrite deletes these and nothing else
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_WEIGHTS, CHECKPOINT_STATE, CHECKPOINT_CONFIG = "student.safetensors", "state.pt", "config.json"
CHECKPOINT_COMPLETE = "COMPLETE"  # written last: a checkpoint directory without it is torn
RUN_OUTPUTS = ("adapter.safetensors", "adapter_config.json", "config.yaml", "summary.json", "loss_curve.png",
               LOG_FILE)
_TMP, _OLD = ".tmp", ".old"


def remove_run_outputs(run_dir: Path) -> list[Path]:
    """Delete what stage 2 wrote into ``run_dir`` (checkpoints, adapter, logs, plots); files of anyone
    else stay. Returns the deleted paths."""
    gone = []
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + _TMP, CHECKPOINT_DIR + _OLD):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            gone.append(run_dir / name)
    for name in RUN_OUTPUTS:
        for path in (run_dir / name, run_dir / (name + ".tmp")):
            if path.is_file():
                path.unlink()
                gone.append(path)
    return gone


def _describe_diff(old: dict, new: dict) -> str:
    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys)


class Checkpoint:
    """``runs/<name>/checkpoint``: student tensors (safetensors) + optimiser/scheduler/RNG + step.

    Saved as a whole directory: written beside as ``checkpoint.tmp`` (``COMPLETE`` last), then the old
    one renamed away and the new one renamed in. A kill at any point leaves one complete checkpoint
    that ``load`` finds (in ``checkpoint``, or in ``checkpoint.tmp`` when the kill fell between the
    two renames) — never a silent restart from step 0.
    """

    def __init__(self, directory: Path, config: dict):
        self.dir = directory
        self.config = {k: v for k, v in config.items() if k not in RESUMABLE_KEYS}
        self._tmp = directory.with_name(directory.name + _TMP)
        self._old = directory.with_name(directory.name + _OLD)

    def _complete(self, d: Path) -> bool:
        # ``checkpoint`` itself only ever appears by renaming a complete directory (checkpoints of
        # older versions have no COMPLETE file but were made the same way)
        return (d / CHECKPOINT_COMPLETE).is_file() or (d == self.dir and (d / CHECKPOINT_CONFIG).is_file())

    def recover(self) -> None:
        """Finish an interrupted save: keep the newest complete checkpoint, drop torn ones."""
        if not self._complete(self.dir) and self._complete(self._tmp):
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self._tmp.rename(self.dir)
        if not self.dir.exists() and self._complete(self._old):
            self._old.rename(self.dir)
        for d in (self._tmp, self._old):
            shutil.rmtree(d, ignore_errors=True)

    def check_config(self, overwrite: bool) -> None:
        """Refuse to resume a run made with other settings (naming them) unless ``overwrite``, which
        deletes only what stage 2 wrote into the run directory."""
        self.recover()
        saved = self.dir / CHECKPOINT_CONFIG
        if not saved.exists():
            if overwrite:
                remove_run_outputs(self.dir.parent)
            return
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError) as err:
            old = {"unreadable checkpoint config": str(err)}
        diff = _describe_diff(old, self.config)
        if diff and not overwrite:
            raise UserError(f"{self.dir.parent} holds a run with other settings ({diff}); pass --overwrite to "
                            "start over or --name for a new run")
        if overwrite:
            remove_run_outputs(self.dir.parent)

    def load(self) -> dict | None:
        self.recover()
        if not self._complete(self.dir):
            return None
        try:
            state = torch.load(self.dir / CHECKPOINT_STATE, weights_only=True)
            state["tensors"] = load_file(str(self.dir / CHECKPOINT_WEIGHTS))
        except Exception as err:  # noqa: BLE001 - any decode failure of our own file means the same
            raise UserError(f"the checkpoint in {self.dir} is unreadable ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160]}); pass --overwrite to start the run over") from err
        return state

    def save(self, tensors: dict, optimizer: Any, scheduler: Any, step: int) -> None:
        tmp = self._tmp
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / CHECKPOINT_WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "rng": torch.get_rng_state()}, tmp / CHECKPOINT_STATE)
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        (tmp / CHECKPOINT_COMPLETE).write_text(f"{step}\n")
        if self.dir.exists():
            self.dir.rename(self._old)
        tmp.rename(self.dir)
        shutil.rmtree(self._old, ignore_errors=True)

    @property
    def exists(self) -> bool:
        return self._complete(self.dir)
