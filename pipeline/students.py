"""One interface over the three kinds of students: MimIC heads, LIVE vectors, LoRA (PEFT).

``new_student`` builds a fresh one on a model, ``load_student_dir`` reloads a saved one; both
return a ``Student`` with ``trainable()``, ``disabled()`` (run the base model), ``save(dir)`` and
``detach()`` (the model is exactly the base model again). LoRA targets only the language model's decoder self-attention projections, found by
module identity (never vision towers or cross-attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
from pipeline.attention import attach_live, attach_mimic
from pipeline.families.base import decoder_layers

LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05}


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
    """A student attached to ``model``. ``module`` holds MimIC/LIVE parameters (None for LoRA)."""

    config: AdapterConfig
    model: nn.Module
    module: nn.Module | None
    handle: Any = None

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

    def save(self, directory: str | Path, **info: Any) -> Path:
        return save_adapter(directory, replace(self.config, **info), self.tensors())

    def detach(self) -> None:
        """Remove the student; the model is the base model again (LoRA layers are swapped back
        for the Linear layers they wrap)."""
        if self.handle is not None:
            self.handle.detach()
            return
        from peft.tuners.lora import LoraLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.get_base_layer())


def _attach(config: AdapterConfig, model: nn.Module, module: nn.Module | None) -> Student:
    if config.method == "mimic":
        return Student(config, model, module, attach_mimic(model, module))
    if config.method == "live":
        return Student(config, model, module, attach_live(model, module))
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=config.lora["r"], lora_alpha=config.lora["alpha"], lora_dropout=config.lora["dropout"],
        target_modules=config.lora["target_modules"],
    )
    inject_adapter_in_model(lora, model)
    return Student(config, model, None)


def new_student(method: str, variant: str, model: nn.Module, geometry: Any, base_model: str = "", **info: Any) -> Student:
    """A fresh student (the identity for MimIC and LIVE at step 0) attached to ``model``."""
    layers, heads, head_dim, hidden = geometry_tuple(geometry)
    lora = {**LORA_DEFAULTS, "target_modules": _lora_targets(model)} if method == "lora" else {}
    config = AdapterConfig(
        method=method, variant=variant if method == "mimic" else "mimic", num_layers=layers, num_heads=heads,
        head_dim=head_dim, hidden_size=hidden, base_model=base_model, lora=lora, **info,
    )
    module = None if method == "lora" else build_student(config)
    return _attach(config, model, module)


def load_student_dir(directory: str | Path, model: nn.Module, geometry: Any, model_name: str) -> Student:
    """Reload a saved student onto ``model``; refuses one made for other shapes, naming both."""
    config = read_adapter_config(directory)
    check_fits(config, geometry_tuple(geometry), model_name)
    tensors = read_adapter_tensors(directory)
    module = None if config.method == "lora" else build_student(config)
    student = _attach(config, model, module)
    student.load_tensors({k: v.to(next(model.parameters()).device) for k, v in tensors.items()})
    return student
