"""One interface over every student method (``pipeline.methods``): MimIC heads, LIVE vectors,
LoRA (PEFT) and plug-ins.

``new_student`` builds a fresh one on a model (in training mode), ``load_student_dir`` reloads a
saved one (in inference mode: no LoRA dropout, so evaluation is deterministic); both return a
``Student`` with ``trainable()``, ``disabled()`` (run the base model), ``train()`` / ``eval()``,
``save(dir)`` and ``detach()`` (the model is exactly the base model again, requires_grad flags
included). What a method does is its ``MethodSpec``'s business; this module only delegates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.adapters import (
    AdapterConfig,
    check_fits,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from pipeline.methods import Attachment, get_method


def geometry_tuple(geometry: Any) -> tuple[int, int, int, int]:
    return (geometry.num_layers, geometry.num_heads, geometry.head_dim, geometry.hidden_size)


_DELEGATED = frozenset({"trainable", "tensors", "load_tensors", "disabled"})


@dataclass
class Student:
    """A student of ``config.method`` attached to ``model`` through its method's ``attachment``."""

    config: AdapterConfig
    model: nn.Module
    attachment: Attachment

    @property
    def module(self) -> nn.Module | None:
        """The parameter module of methods that have one (MimIC, LIVE), else None (LoRA)."""
        return getattr(self.attachment, "module", None)

    def __getattr__(self, name: str) -> Any:
        """``trainable()``, ``tensors()``, ``load_tensors(t)``, ``disabled()`` (run the base model inside
        the block: teacher forwards, zero-shot baselines) are the attachment's own."""
        if name in _DELEGATED:
            return getattr(self.attachment, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def train(self, mode: bool = True) -> Student:
        """The student's own modules in training (LoRA dropout on) or inference mode; the base model
        keeps its own mode. Returns self."""
        self.attachment.train(mode)
        return self

    def eval(self) -> Student:
        """Inference mode (no dropout): what every evaluation needs; returns self."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.attachment.training

    def save(self, directory: str | Path, **info: Any) -> Path:
        return save_adapter(directory, replace(self.config, **info), self.tensors())

    def detach(self) -> None:
        """Remove the student; the model is the base model again."""
        self.attachment.detach()


def new_student(method: str, variant: str, model: nn.Module, geometry: Any, base_model: str = "", **info: Any) -> Student:
    """A fresh student of ``method`` (the identity at step 0 where the method allows) attached to
    ``model``, in training mode. ``variant`` is MimIC's; other methods record ``mimic`` there."""
    spec = get_method(method)
    layers, heads, head_dim, hidden = geometry_tuple(geometry)
    settings = {"variant": "mimic", **spec.settings(model, variant)}
    config = AdapterConfig(method=method, num_layers=layers, num_heads=heads, head_dim=head_dim,
                           hidden_size=hidden, base_model=base_model, **settings, **info)
    return Student(config, model, spec.attach(config, model)).train()


def load_student_dir(directory: str | Path, model: nn.Module, geometry: Any, model_name: str) -> Student:
    """Reload a saved student onto ``model`` in inference mode; refuses one made for other shapes, or
    whose tensors are not what its config describes, naming both. ``.train()`` to train it further."""
    config = read_adapter_config(directory)
    check_fits(config, geometry_tuple(geometry), model_name)
    tensors = read_adapter_tensors(directory, config, model)
    student = Student(config, model, get_method(config.method).attach(config, model))
    try:
        student.load_tensors({k: v.to(next(model.parameters()).device) for k, v in tensors.items()})
    except BaseException:
        student.detach()  # the caller gets no student to detach: leave the model as it came
        raise
    return student.eval()
