"""One interface over the three kinds of students: MimIC heads, LIVE vectors, LoRA (PEFT).

``new_student`` builds a fresh one on a model (in training mode), ``load_student_dir`` reloads a
saved one (in inference mode); both return a ``Student`` with ``trainable()``, ``disabled()`` (run
the base model), ``train()`` / ``eval()``, ``save(dir)`` and ``detach()`` (the model is exactly the
base model again, requires_grad flags included). LoRA targets only the language model's decoder
self-attention projections, found by module identity (never vision towers or cross-attention).

Train/eval matters for LoRA only: PEFT creates its layers in training mode whatever the model's mode,
so without ``eval()`` its dropout would run during evaluation and two scorings of one adapter would
differ. MimIC and LIVE have no dropout. The base model's own mode is never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.adapters import (
    AdapterConfig,
    AdapterError,
    build_student,
    check_fits,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from pipeline.attention import attach_live, attach_mimic, freeze_base
from pipeline.families.base import decoder_layers

LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05}
_MISSING = object()


def geometry_tuple(geometry: Any) -> tuple[int, int, int, int]:
    return (geometry.num_layers, geometry.num_heads, geometry.head_dim, geometry.hidden_size)


def _lora_targets(model: nn.Module) -> list[str]:
    """Full names of the Linear projections inside each decoder layer's self-attention."""
    wanted = {id(m) for layer in decoder_layers(model) for m in layer.self_attn.children() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if id(m) in wanted]


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@dataclass
class Student:
    """A student attached to ``model``. ``module`` holds MimIC/LIVE parameters (None for LoRA);
    ``handle`` detaches MimIC/LIVE, ``undo`` (run last to first) what a LoRA attach changed besides
    its layers."""

    config: AdapterConfig
    model: nn.Module
    module: nn.Module | None
    handle: Any = None
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        if self.module is not None:
            return list(self.module.named_parameters())
        return [(n, p) for n, p in self.model.named_parameters() if "lora_" in n]

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.module is not None:
            return self.module.state_dict()
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.module is not None:
            self.module.load_state_dict(tensors)
            return
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise AdapterError(f"LoRA tensors do not fit this model: unexpected {result.unexpected_keys[:4]}")

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model inside the block (teacher forwards, zero-shot baselines)."""
        if self.handle is not None:
            with self.handle.disabled():
                yield
            return
        layers = _lora_layers(self.model)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
                for p_name, p in layer.named_parameters():
                    if "lora_" in p_name:
                        p.requires_grad_(True)

    def train(self, mode: bool = True) -> Student:
        """Put the student's own modules in training (LoRA dropout on) or inference mode; returns self.

        Only the student's modules: the base model (vision tower, its dropout) keeps its own mode.
        """
        if self.module is not None:
            self.module.train(mode)
            return self
        for layer in _lora_layers(self.model):
            layer.training = mode
            for child in layer.children():
                if child is not layer.base_layer:
                    child.train(mode)
        return self

    def eval(self) -> Student:
        """Inference mode (no LoRA dropout): what every evaluation needs; returns self."""
        return self.train(False)

    @property
    def training(self) -> bool:
        if self.module is not None:
            return self.module.training
        return any(layer.training for layer in _lora_layers(self.model))

    def save(self, directory: str | Path, **info: Any) -> Path:
        return save_adapter(directory, replace(self.config, **info), self.tensors())

    def detach(self) -> None:
        """Remove the student; the model is the base model again (LoRA layers are swapped back
        for the Linear layers they wrap, PEFT's ``peft_config`` attribute goes) and every base
        parameter's requires_grad is what it was before the attach."""
        if self.handle is not None:
            self.handle.detach()
            return
        from peft.tuners.lora import LoraLayer

        swapped: list[str] = []
        for name, module in list(self.model.named_modules()):
            # a LoRA layer nested in one already swapped out left the model with it
            if isinstance(module, LoraLayer) and not any(name.startswith(f"{s}.") for s in swapped):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.get_base_layer())
                swapped.append(name)
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()


def _attach(config: AdapterConfig, model: nn.Module, module: nn.Module | None) -> Student:
    if config.method == "mimic":
        return Student(config, model, module, attach_mimic(model, module))
    if config.method == "live":
        return Student(config, model, module, attach_live(model, module))
    from peft import LoraConfig, inject_adapter_in_model

    undo = [freeze_base(model)]  # before the injection, so the LoRA parameters keep requires_grad
    previous = model.__dict__.get("peft_config", _MISSING)

    def restore_peft_config() -> None:
        if previous is _MISSING:
            model.__dict__.pop("peft_config", None)
        else:
            model.__dict__["peft_config"] = previous

    undo.append(restore_peft_config)
    lora = LoraConfig(
        r=config.lora["r"], lora_alpha=config.lora["alpha"], lora_dropout=config.lora["dropout"],
        target_modules=config.lora["target_modules"],
    )
    student = Student(config, model, None, undo=undo)
    try:
        inject_adapter_in_model(lora, model)
    except BaseException:
        student.detach()
        raise
    return student


def new_student(method: str, variant: str, model: nn.Module, geometry: Any, base_model: str = "", **info: Any) -> Student:
    """A fresh student (the identity for MimIC and LIVE at step 0) attached to ``model``, in training
    mode: LoRA keeps PEFT's dropout while it trains."""
    layers, heads, head_dim, hidden = geometry_tuple(geometry)
    lora = {**LORA_DEFAULTS, "target_modules": _lora_targets(model)} if method == "lora" else {}
    config = AdapterConfig(
        method=method, variant=variant if method == "mimic" else "mimic", num_layers=layers, num_heads=heads,
        head_dim=head_dim, hidden_size=hidden, base_model=base_model, lora=lora, **info,
    )
    module = None if method == "lora" else build_student(config)
    return _attach(config, model, module).train()


def load_student_dir(directory: str | Path, model: nn.Module, geometry: Any, model_name: str) -> Student:
    """Reload a saved student onto ``model`` in inference mode (no LoRA dropout: evaluation must be
    deterministic); refuses one made for other shapes, naming both. ``.train()`` to train it further."""
    config = read_adapter_config(directory)
    check_fits(config, geometry_tuple(geometry), model_name)
    tensors = read_adapter_tensors(directory)
    module = None if config.method == "lora" else build_student(config)
    student = _attach(config, model, module)
    try:
        student.load_tensors({k: v.to(next(model.parameters()).device) for k, v in tensors.items()})
    except BaseException:
        student.detach()  # the caller gets no student to detach: leave the model as it came
        raise
    return student.eval()
