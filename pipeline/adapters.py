"""Students on disk: ``adapter.safetensors`` + ``adapter_config.json`` (this module owns the format).

A student is one of the registered methods (``pipeline.methods``: MimIC with its variants, LIVE,
LoRA through PEFT, or a plug-in); its spec says which tensors it holds. The weights file holds only the
student's tensors — never base-model weights — and is read with safetensors (never a pickle, which
can run code when loaded). The config records the method, the shapes, and which base model (id,
revision, fingerprint) and teacher store produced it; loading into a model of other shapes fails
with a message naming both.

Every reader of a student (training resume, `pipeline evaluate`) goes through
``read_adapter_config`` and ``read_adapter_tensors``, which refuse — with one-line ``AdapterError``
messages naming the file and the problem — a config of wrong types, a truncated or non-safetensors
weights file, missing or unexpected tensors, shapes that disagree with the config, non-floating
dtypes, and NaN or infinite values (a diverged training run).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import UserError
from pipeline.methods import REGISTRY, UnknownMethodError, get_method

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
RESTORE = "restore the run's files or re-train it with `pipeline train-student`"
"""How to fix a damaged student: the end of most messages below."""


class AdapterError(UserError):
    """A student file that is missing, malformed, or made for another model."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_problem(config: AdapterConfig) -> str | None:
    """What is wrong with a config's values (types, ranges, the method's own settings), or None."""
    if not isinstance(config.method, str):
        return f"unknown student method {config.method!r}; expected a method name, one of {', '.join(REGISTRY.names())}"
    try:
        spec = get_method(config.method)
    except UnknownMethodError as err:
        return str(err)
    for key in ("num_layers", "num_heads", "head_dim", "hidden_size"):
        value = getattr(config, key)
        if not _is_int(value) or value < 1:
            return f"'{key}' is {value!r}, expected a positive integer"
    for key in ("base_model", "base_fingerprint"):
        if not isinstance(getattr(config, key), str):
            return f"'{key}' is {getattr(config, key)!r}, expected a string"
    if config.base_revision is not None and not isinstance(config.base_revision, str):
        return f"'base_revision' is {config.base_revision!r}, expected a string or null"
    for key in ("store_fingerprint", "lora"):
        if not isinstance(getattr(config, key), dict):
            return f"'{key}' is {getattr(config, key)!r}, expected a mapping"
    if not _is_int(config.format_version):
        return f"'format_version' is {config.format_version!r}, expected an integer"
    problem = spec.check(config)  # the method's own settings first: its message is the more telling
    if problem is None and not isinstance(config.variant, str):
        problem = f"'variant' is {config.variant!r}, expected a string"
    return problem


@dataclass(frozen=True)
class AdapterConfig:
    """What a student is and what it was made for.

    method: mimic | live | lora. variant: the MimIC variant (``mimic`` for live/lora).
    num_layers, num_heads, head_dim, hidden_size: the decoder geometry it was built for.
    base_model: the model id or alias; base_revision / base_fingerprint: what exactly was loaded.
    store_fingerprint: the teacher store's fingerprint (empty for students trained online).
    lora: PEFT LoRA settings (r, alpha, dropout, target modules) for ``method="lora"``.
    """

    method: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    variant: str = "mimic"
    base_model: str = ""
    base_revision: str | None = None
    base_fingerprint: str = ""
    store_fingerprint: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    format_version: int = ADAPTER_FORMAT_VERSION

    def __post_init__(self):
        problem = _config_problem(self)
        if problem:
            raise AdapterError(problem)

    @property
    def shapes(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_heads, self.head_dim, self.hidden_size)

    def describe(self) -> str:
        """``mimic/head_shared``, ``live`` or ``lora r=16``: the kind of student, for messages."""
        return get_method(self.method).describe(self)


def build_student(config: AdapterConfig) -> nn.Module:
    """Fresh student parameters (identity at init) of a method whose parameters are one module
    (MimIC heads, LIVE vectors); LoRA's live inside the model."""
    spec = get_method(config.method)
    if spec.build is None:
        raise AdapterError(f"{config.method} students have no parameter module of their own (PEFT builds LoRA "
                           "inside the model); attach one with pipeline.students.new_student")
    return spec.build(config)


def save_adapter(directory: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``directory`` atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(plain, str(tmp), metadata={"format_version": str(ADAPTER_FORMAT_VERSION)})
    tmp.replace(directory / ADAPTER_WEIGHTS)
    tmp_cfg = directory / (ADAPTER_CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
    tmp_cfg.replace(directory / ADAPTER_CONFIG)
    return directory


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """Read and validate ``adapter_config.json`` (keys, types and ranges; one-line errors)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {directory}; is it a run directory of `pipeline train-student`?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {RESTORE}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} cannot be read ({err}); expected a readable UTF-8 JSON file: {RESTORE}") from err
    if not isinstance(data, dict):
        raise AdapterError(f"{path} holds a JSON {type(data).__name__}, expected an object of adapter settings; {RESTORE}")
    known = [f.name for f in fields(AdapterConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise AdapterError(f"{path} has unknown keys {unknown} (known: {', '.join(known)}); written by a newer "
                           "version of the pipeline? update it, or remove those keys")
    required = [f.name for f in fields(AdapterConfig) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise AdapterError(f"{path} misses the keys {missing}; {RESTORE}")
    version = data.get("format_version", ADAPTER_FORMAT_VERSION)
    if _is_int(version) and version > ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {version}; this code reads up to {ADAPTER_FORMAT_VERSION}: "
                           "update the pipeline")
    try:
        return AdapterConfig(**data)
    except AdapterError as err:
        raise AdapterError(f"{path}: {err}; {RESTORE}") from err


def _foreign_format(path: Path) -> str | None:
    """'a pickle' / 'a zip (torch.save) archive' when the file starts like one, else None."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "zip archive (torch.save format, which holds pickles)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "Python pickle"
    return None


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated, damaged or pickle file is an ``AdapterError``.

    Only safetensors is ever parsed: a pickle renamed to ``.safetensors`` is recognised and refused,
    never unpickled.
    """
    path = Path(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        foreign = _foreign_format(path)
        if foreign:
            raise AdapterError(f"{path} is a {foreign}, not a safetensors file; it was not loaded (pickles can "
                               f"run code): {RESTORE}") from err
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AdapterError(f"{path} is not a readable safetensors file ({reason}): it is truncated or damaged; "
                           f"{RESTORE}") from err
    except OSError as err:
        raise AdapterError(f"{path} cannot be read ({err.strerror or err}); expected a readable safetensors "
                           f"file: check its permissions or {RESTORE}") from err


def expected_shapes(config: AdapterConfig, model: nn.Module | None = None) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> shape a student of ``config`` holds (``None``: a size only the model knows), as its
    method declares them (``MethodSpec.shapes``)."""
    try:
        return get_method(config.method).shapes(config, model)
    except AdapterError:
        raise
    except UserError as err:
        raise AdapterError(f"{ADAPTER_CONFIG}: {err}") from err


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("any" if s is None else str(s) for s in shape) + "]"


def _some(names: list[str]) -> str:
    return str(names[:4])[:-1] + (f", ... {len(names) - 4} more]" if len(names) > 4 else "]")


def check_adapter_tensors(path: str | Path, tensors: dict[str, torch.Tensor], config: AdapterConfig,
                          model: nn.Module | None = None) -> None:
    """Refuse tensors that are not the student ``config`` describes: names, shapes, dtype, finiteness."""
    expected = expected_shapes(config, model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{path} does not hold the tensors of the {config.describe()} student its {ADAPTER_CONFIG} describes: "
            f"missing {_some(missing)}, unexpected {_some(unexpected)}; the two files do not belong together: "
            f"{RESTORE}")
    for name, want in expected.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
            raise AdapterError(
                f"{path}: tensor '{name}' has shape {list(got)}, but {ADAPTER_CONFIG} ({config.describe()}, "
                f"layers={config.num_layers}, heads={config.num_heads}, head_dim={config.head_dim}, "
                f"hidden={config.hidden_size}) expects {_shape_text(want)}; {RESTORE}")
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            raise AdapterError(f"{path}: tensor '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                               f"expected a floating-point dtype (float32, bfloat16, float16); {RESTORE}")
    for name, tensor in sorted(tensors.items()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterError(f"{path}: tensor '{name}' has {bad} non-finite values (NaN or inf) of {tensor.numel()}, "
                               "expected finite numbers; the training diverged or the file is damaged: re-train "
                               "the run with `pipeline train-student` (e.g. a lower --lr)")


def read_adapter_tensors(directory: str | Path, config: AdapterConfig | None = None,
                         model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read ``adapter.safetensors`` (safetensors only: never a pickle) and check it against ``config``
    (default: the directory's ``adapter_config.json``) and, for LoRA sizes, ``model``."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {directory}; is it a run directory of `pipeline train-student`?")
    tensors = read_tensor_file(path)
    check_adapter_tensors(path, tensors, config if config is not None else read_adapter_config(directory), model)
    return tensors


def check_fits(config: AdapterConfig, geometry: tuple[int, int, int, int], model_name: str) -> None:
    """Refuse a student built for other shapes, naming both."""
    if tuple(config.shapes) != tuple(geometry):
        names = ("layers", "heads", "head_dim", "hidden")
        got = ", ".join(f"{n}={v}" for n, v in zip(names, geometry, strict=True))
        want = ", ".join(f"{n}={v}" for n, v in zip(names, config.shapes, strict=True))
        raise AdapterError(
            f"adapter was made for {config.base_model or 'another model'} ({want}) "
            f"but the model {model_name} has {got}; evaluate it on the model it was trained on"
        )


def load_student(directory: str | Path, geometry: tuple[int, int, int, int], model_name: str) -> tuple[AdapterConfig, nn.Module]:
    """Load a MimIC or LIVE student checked against ``geometry`` = (layers, heads, head_dim, hidden)."""
    config = read_adapter_config(directory)
    check_fits(config, geometry, model_name)
    tensors = read_adapter_tensors(directory, config)
    module = build_student(config)
    module.load_state_dict(tensors)  # names and shapes were checked above
    return config, module
