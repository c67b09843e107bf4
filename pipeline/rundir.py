"""The run directory ``runs/<name>/`` of stage 2: the one module that names, writes and reads its files.

    checkpoint/          student tensors (safetensors), optimiser / scheduler / RNG state, step, the
                         settings it was made with; saved whole and swapped in (see ``Checkpoint``)
    train_log.jsonl      one JSON row per optimiser step (loss and its parts, lr, grad norm)
    config.yaml          the training options, with the values used (defaults resolved)
    summary.json         steps, final loss, throughput, the versions of the tool, Python and the libraries
    train.log            what the command printed (stdout and stderr lines; a progress bar's final state,
                         not its redraws), appended by every run and resumption under a header line
    loss_curve.png       the loss curve, drawn from the log
    fit.json             training-free methods (tv, fv): the layer sweep and what the fit chose
    adapter.safetensors, adapter_config.json   the student (format owned by ``pipeline.adapters``)
    .lock                one writer at a time (``pipeline.locks``)

``config.yaml`` and ``summary.json`` carry ``run_schema_version``; a reader refuses a newer one.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_DIR, PEFT_WEIGHTS
from pipeline.config import UserError, changed_keys
from pipeline.locks import DirLock, dir_lock
from pipeline.versions import library_versions

RUN_SCHEMA_VERSION = 1
LOG_FILE, CONFIG_FILE, SUMMARY_FILE, CURVE_FILE = "train_log.jsonl", "config.yaml", "summary.json", "loss_curve.png"
OUTPUT_LOG = "train.log"
FIT_FILE = "fit.json"
"""What a training-free method's fit chose and measured (its layer sweep; FV's head effects)."""
VERSIONS_KEY = "versions"
SCHEMA_KEY = "run_schema_version"
RESUMABLE_KEYS = ("max_steps", "num_workers", "checkpoint_every", "overwrite", "force", "device", "runs_dir", "name",
                  "report_to", "compile")
"""Options that may change between a run and its resumption (the rest must match the checkpoint's); an
experiment tracker only watches, compiling computes the same values."""


CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_WEIGHTS, CHECKPOINT_STATE, CHECKPOINT_CONFIG = "student.safetensors", "state.pt", "config.json"
CHECKPOINT_COMPLETE = "COMPLETE"  # written last: a checkpoint directory without it is torn
RUN_OUTPUTS = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, CONFIG_FILE, SUMMARY_FILE, CURVE_FILE, LOG_FILE, OUTPUT_LOG, FIT_FILE)
"""Every file stage 2 writes into ``runs/<name>/`` (besides the checkpoint directories and the lock):
``--overwrite`` deletes these and nothing else."""
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
    peft = run_dir / PEFT_DIR  # a LoRA student's PEFT copy: our two files; the folder only if nothing else is in it
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if (peft / name).is_file():
            (peft / name).unlink()
            gone.append(peft / name)
    if peft.is_dir() and not any(peft.iterdir()):
        peft.rmdir()
        gone.append(peft)
    return gone


def _legacy(old: dict, now: dict) -> dict:
    """A checkpoint config of an earlier version, read as this one means it: a run from a store recorded
    ``n_queries: 1000``, the option's old default, which only ``--online`` read (a store run trained on all
    of the store's queries, what ``None`` means now). A run from before ``--mixed-precision`` trained in full
    precision (``no``)."""
    if old.get("cache") and old.get("n_queries") == 1000 and now.get("n_queries") is None:
        old = {**old, "n_queries": None}
    if "mixed_precision" not in old and "mixed_precision" in now:
        old = {**old, "mixed_precision": "no"}
    return old


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
        diff = "; ".join(changed_keys(_legacy(old, self.config), self.config, "the run's", "now"))
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

    def save(self, tensors: dict, optimizer: Any, scheduler: Any, step: int, extra: dict | None = None) -> None:
        """``extra``: more state of the loop (e.g. the fp16 loss scaler), returned by ``load`` under its keys."""
        tmp = self._tmp
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / CHECKPOINT_WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "rng": torch.get_rng_state(), **(extra or {})}, tmp / CHECKPOINT_STATE)
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        (tmp / CHECKPOINT_COMPLETE).write_text(f"{step}\n")
        if self.dir.exists():
            self.dir.rename(self._old)
        tmp.rename(self.dir)
        shutil.rmtree(self._old, ignore_errors=True)

    @property
    def exists(self) -> bool:
        return self._complete(self.dir)


class RunDir:
    """``runs/<name>/``: paths, the lock, the training config and summary, and the checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def curve_path(self) -> Path:
        return self.path / CURVE_FILE

    @property
    def output_log_path(self) -> Path:
        return self.path / OUTPUT_LOG

    def lock(self) -> DirLock:
        return dir_lock(self.path)

    def checkpoint(self, settings: dict) -> Checkpoint:
        return Checkpoint(self.path / CHECKPOINT_DIR, settings)

    def write_config(self, config: dict) -> None:
        _write_atomic(self.path / CONFIG_FILE, yaml.safe_dump({SCHEMA_KEY: RUN_SCHEMA_VERSION, **config},
                                                              sort_keys=False))

    def write_summary(self, summary: dict) -> None:
        """``summary.json``: ``summary`` plus the versions of the tool, Python and the libraries that wrote it."""
        _write_atomic(self.path / SUMMARY_FILE, json.dumps(
            {SCHEMA_KEY: RUN_SCHEMA_VERSION, **summary, VERSIONS_KEY: library_versions()}, indent=2))

    def read_config(self) -> dict:
        """The training options of the run (without the schema key), or {} when it has no config.yaml."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} cannot be read as YAML ({reason}); expected the mapping `pipeline "
                            "train-student` writes: restore it or delete it (the task and store then come from "
                            "the adapter or from --task)") from err
        if not isinstance(data, dict):
            raise UserError(f"{path} holds a {type(data).__name__}, expected a mapping of training options; "
                            "restore it or delete it (the task and store then come from the adapter or from --task)")
        version = data.pop(SCHEMA_KEY, RUN_SCHEMA_VERSION)
        if not isinstance(version, int) or version > RUN_SCHEMA_VERSION:
            raise UserError(f"{path} has {SCHEMA_KEY} {version!r}; this code reads up to {RUN_SCHEMA_VERSION}: "
                            "use a newer version of the pipeline")
        return data

    def read_log(self, upto: int | None = None) -> list[dict]:
        """The logged steps (those <= ``upto`` when given); a line torn by a kill ends the log."""
        if not self.log_path.is_file():
            return []
        rows = []
        for line in self.log_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if upto is None or row["step"] <= upto:
                rows.append(row)
        return rows

    def rewrite_log(self, rows: list[dict]) -> None:
        _write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in rows))

    def remove_outputs(self) -> list[Path]:
        return remove_run_outputs(self.path)


class OutputLog:
    """Copy what a command prints (``sys.stdout`` and ``sys.stderr``) into a run's ``train.log``.

    ``with OutputLog(enabled) as out:`` holds the lines in memory until ``out.attach(path)`` names the
    file (the run directory is known, locked and checked only after setup); they are written then, under
    a header with the time, the command line and the versions, and every later line as it is printed.
    A carriage return ends a redraw: only what follows the last one on a line is kept, so a progress
    bar leaves its final state, not its redraws. An exception leaving the block is logged as one
    ``error:`` line. Output of other processes and of handlers holding the original stream is not seen.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._held: list[str] = []
        self._file: TextIO | None = None
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> OutputLog:
        if self.enabled:
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def attach(self, path: Path) -> None:
        """Append the held lines and every later one to ``path``."""
        if not self.enabled or self._file is not None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8", buffering=1)  # line-buffered: nothing held at a fork
        argv = shlex.join(sys.argv)  # the process's command line
        versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
        self._file.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {argv} ({versions})\n")
        for line in self._held:
            self._file.write(line)
        self._held = []

    def line(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
        else:
            self._held.append(text)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.log is self:
                tee.flush_line()
        if exc_type is not None:
            message = str(exc).splitlines()[0] if str(exc) else ""
            self.line(f"error: {exc_type.__name__}{': ' + message if message else ''}\n")
        out, err = self._saved
        if isinstance(sys.stdout, _Tee) and sys.stdout.log is self:
            sys.stdout = out
        if isinstance(sys.stderr, _Tee) and sys.stderr.log is self:
            sys.stderr = err
        if self._file is not None:
            self._file.close()
            self._file = None


class _Tee:
    """A text stream writing through to ``stream`` and, line by line, into an ``OutputLog``; asks
    ``stream`` everything else (``isatty``, ``fileno``, ``encoding``), so a progress bar behaves as on it."""

    def __init__(self, stream: Any, log: OutputLog):
        self.stream, self.log, self._pending = stream, log, ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self.log.line(line.rsplit("\r", 1)[-1] + "\n")
        self._pending = self._pending.rsplit("\r", 1)[-1]  # a redraw replaces the line: memory stays one line
        return len(text) if n is None else n

    def flush_line(self) -> None:
        if self._pending.strip():
            self.log.line(self._pending + "\n")
        self._pending = ""

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str | None:
        return getattr(self.stream, "encoding", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
