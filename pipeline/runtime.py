"""What every stage shares: devices and ranks, model loading with defaults, a progress bar."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config import UserError
from pipeline.families import attention_geometry, family_for


@dataclass
class Loaded:
    """A model ready for a stage. ``source`` carries the name, revision and fingerprint that stores and
    adapters record (a store's ``model*`` attributes)."""

    model: Any
    processor: Any
    family: Any
    source: Any
    device: torch.device
    decoding: Any = None  # pipeline.decoding.CompiledDecoding when generation runs compiled (evaluate --compile)

    @property
    def geometry(self):
        return attention_geometry(self.model)


@dataclass(frozen=True)
class ModelSourceInfo:
    """Identity of a model that was built in-process (tests, benchmarks) rather than loaded by name;
    the same fields the stages read from ``pipeline.models.ModelSource``."""

    alias: str
    revision: str | None
    fingerprint: str

    @property
    def recorded(self) -> str:
        return self.alias


def _cpu_only() -> bool:
    # without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU, and every
    # process would silently run alone as rank 0 (gloo is then the backend)
    return not torch.cuda.is_available()


WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Where a launcher (torchrun, mpirun) gives the number of processes; accelerate reads the same."""


def _state():
    from accelerate import PartialState

    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in os.environ
            and not any(v in os.environ for v in WORLD_SIZE_VARIABLES)):
        # `accelerate launch --cpu --num_processes N` without an MPI hostfile starts one process, alone
        raise UserError("accelerate launch --cpu started one process only (it starts several CPU processes through "
                        "mpirun, with --mpirun_hostfile): for N processes on one machine without a GPU run "
                        "`accelerate launch --multi_gpu --num_processes N -m pipeline ...` (gloo)")
    return PartialState(cpu=_cpu_only())


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None,
                     project_dir: Path | None = None) -> Any:
    """An ``accelerate.Accelerator`` over the process state ``dist_info`` and ``barrier`` read (the same
    ``cpu`` flag, so the same ranks and process group), with its own mixed precision and trackers.

    Accelerate keeps the precision in a process-wide ``AcceleratorState`` that refuses a second value, but
    one process may train several runs (the demo, a notebook, the tests), each with its own: the
    accelerator layer is reset before each, the ``PartialState`` below it (process group, ranks) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _state()
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=_cpu_only(), mixed_precision=mixed_precision, log_with=log_with,
                       project_dir=None if project_dir is None else str(project_dir))


def dist_info() -> tuple[int, int, torch.device]:
    """(rank, world size, device) — one process per device under ``accelerate launch``/torchrun."""
    state = _state()
    return state.process_index, state.num_processes, state.device


def barrier() -> None:
    _state().wait_for_everyone()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return dist_info()[2]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: the pipeline runs on cpu or cuda (auto picks); got {dev.type}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise UserError(f"unknown dtype '{dtype}'; valid: auto, {', '.join(choices)}")
    return choices[dtype]


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """``--num-workers`` of teacher-cache and train-student: as given, else 4 on CUDA (the device must not wait
    for prompts and collation) and 0 on the CPU (the work runs in the main process)."""
    return num_workers if num_workers is not None else (4 if device.type == "cuda" else 0)


def load_for_stage(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Loaded:
    """Load a model by alias, hub id or path with its language model's attention routed through
    the MimIC attention function (the stock sdpa kernel, plus mu v only where a student is attached)."""
    from transformers import AutoConfig

    from pipeline.attention import ATTN_NAME, register_mimic_attention
    from pipeline.models import load_model, resolve_model

    register_mimic_attention()
    dev = resolve_device(device)
    source = resolve_model(name, revision=revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(source.path, revision=source.revision, trust_remote_code=trust_remote_code)
    family = family_for(config)
    model, processor, source = load_model(
        name,
        dtype=resolve_dtype(dtype, dev),
        attn_implementation=family.attn_implementation(ATTN_NAME),
        device=str(dev),
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    return Loaded(model, processor, family, source, dev)


def check_task_fits_model(task: Any, loaded: Loaded) -> None:
    """Refuse a task with images on a text-only model before any work (UserError naming both)."""
    if loaded.family.encode_image is None and task.spec.kind != "text":
        raise UserError(
            f"task {task.spec.name} ({task.spec.kind}) has images but {loaded.source.alias} is a text-only model "
            f"({loaded.family.name}); use a multimodal model (e.g. --model smollm2-vlm) or a text task "
            "(e.g. --task plurals)"
        )


def wrap_model(model: Any, processor: Any, name: str = "in-process", device: str = "cpu") -> Loaded:
    """A ``Loaded`` for a model built in-process (tests, benchmarks); attention routed as by
    ``load_for_stage``."""
    import hashlib
    import json

    from pipeline.attention import ATTN_NAME, route_attention

    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    fp = hashlib.sha256(cfg.encode()).hexdigest()[:16]
    dev = torch.device(device)
    family = family_for(model.config)
    route_attention(model, family.attn_implementation(ATTN_NAME))
    return Loaded(model.to(dev), processor, family, ModelSourceInfo(name, None, fp), dev)


class Progress:
    """Progress of a stage on stderr, with samples/s and tokens/s; silent off rank 0 or when disabled.

    On a terminal (or in a notebook) a tqdm bar. Otherwise — stderr redirected to a log file or a pipe —
    one plain line every ``plain_interval_s`` seconds and one at the end (no carriage-return redraws: a
    bar redrawn ten times a second wrote about 1 KB/s into a log, 3.6 MB an hour).
    """

    plain_interval_s = 30.0

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "sample", stream: Any = None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.plain = enabled and not _notebook(tqdm) and not _isatty(self.stream)
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled or self.plain, dynamic_ncols=True,
                        file=self.stream)
        self.start = self.printed = time.perf_counter()
        self.printed_n = 0  # units done at the last plain line: the closing line is not printed twice
        self.samples = 0
        self.tokens = 0
        self.postfix: dict[str, Any] = {}

    def update(self, n: int, tokens: int = 0, samples: int | None = None, **postfix: Any) -> None:
        """Advance the bar by ``n`` units; ``samples`` (default ``n``) and ``tokens`` feed the rates."""
        self.n += n
        self.samples += n if samples is None else samples
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = {"samples/s": f"{self.samples / elapsed:.2f}"}
        if self.tokens:
            rates["tokens/s"] = f"{self.tokens / elapsed:.0f}"
        self.postfix = {**rates, **postfix}
        if self.plain:
            if time.perf_counter() - self.printed >= self.plain_interval_s:
                self._line()
            return
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(n)

    def _line(self) -> None:
        self.printed, self.printed_n = time.perf_counter(), self.n
        elapsed = int(self.printed - self.start)
        done = f"{self.n}/{self.total}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")
        rest = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {done} {self.unit}s in {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
              f"{rest}", file=self.stream, flush=True)

    def close(self) -> float:
        if self.plain and self.n and self.n != self.printed_n:
            self._line()
        self.bar.close()
        return time.perf_counter() - self.start


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _notebook(bar_class: type) -> bool:
    """Whether tqdm.auto picked its notebook bar (a notebook's stderr is no TTY but shows a widget)."""
    return any(c.__module__ == "tqdm.notebook" for c in bar_class.__mro__)


def default_store_path(task: str) -> Path:
    name = Path(task).stem if task.endswith((".yaml", ".yml")) else task
    return Path("cache") / f"{name}.zarr"

