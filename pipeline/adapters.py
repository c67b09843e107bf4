"""Students on disk: ``adapter.safetensors`` + ``adapter_config.json`` (this module owns the format).

A student is one of: MimIC (``method="mimic"``, any variant of ``pipeline.mimic.VARIANTS``), LIVE
(``method="live"``) or LoRA (``method="lora"``, through PEFT). The weights file holds only the
student's tensors — never base-model weights — and is read with safetensors (no pickle). The config
records the method, the shapes, and which base model (id, revision, fingerprint) and teacher store
produced it; loading into a model of other shapes fails with a message naming both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import UserError
from pipeline.live import LiveVectors
from pipeline.mimic import VARIANTS, MimicHeads

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
METHODS = ("mimic", "live", "lora")


class AdapterError(UserError):
    """A student file that is missing, malformed, or made for another model."""


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
        if self.method not in METHODS:
            raise AdapterError(f"unknown student method '{self.method}'; valid: {', '.join(METHODS)}")
        if self.method == "mimic" and self.variant not in VARIANTS:
            raise AdapterError(f"unknown MimIC variant '{self.variant}'; valid: {', '.join(VARIANTS)}")

    @property
    def shapes(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_heads, self.head_dim, self.hidden_size)


def build_student(config: AdapterConfig) -> nn.Module:
    """Fresh student parameters (identity at init): a ModuleList of MimicHeads, or LiveVectors."""
    if config.method == "mimic":
        return nn.ModuleList(
            MimicHeads(config.num_heads, config.head_dim, config.variant) for _ in range(config.num_layers)
        )
    if config.method == "live":
        return LiveVectors(config.num_layers, config.hidden_size)
    raise AdapterError("LoRA students are built by PEFT on the model (pipeline.lora), not here")


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
    """Read and validate ``adapter_config.json``."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {directory}; is it a run directory of `pipeline train-student`?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from err
    known = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AdapterError(f"{path} has unknown keys {unknown}; written by a newer version?")
    if data.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {data['format_version']}; this code reads up to {ADAPTER_FORMAT_VERSION}")
    return AdapterConfig(**data)


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read ``adapter.safetensors`` (safetensors only: never a pickle)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {directory}")
    return load_file(str(path))


def check_fits(config: AdapterConfig, geometry: tuple[int, int, int, int], model_name: str) -> None:
    """Refuse a student built for other shapes, naming both."""
    if tuple(config.shapes) != tuple(geometry):
        names = ("layers", "heads", "head_dim", "hidden")
        got = ", ".join(f"{n}={v}" for n, v in zip(names, geometry, strict=True))
        want = ", ".join(f"{n}={v}" for n, v in zip(names, config.shapes, strict=True))
        raise AdapterError(
            f"adapter was made for {config.base_model or 'another model'} ({want}) "
            f"but the model {model_name} has {got}"
        )


def load_student(directory: str | Path, geometry: tuple[int, int, int, int], model_name: str) -> tuple[AdapterConfig, nn.Module]:
    """Load a MimIC or LIVE student checked against ``geometry`` = (layers, heads, head_dim, hidden)."""
    config = read_adapter_config(directory)
    check_fits(config, geometry, model_name)
    module = build_student(config)
    tensors = read_adapter_tensors(directory)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise AdapterError(
            f"{Path(directory) / ADAPTER_WEIGHTS} does not match a {config.method}/{config.variant} student: "
            f"missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}"
        )
    return config, module
