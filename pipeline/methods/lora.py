"""LoRA through PEFT on the language model's decoder self-attention projections only (found by
module identity: never vision towers or cross-attention); trained with CE only.

PEFT creates its layers in training mode whatever the model's mode, so ``train(False)`` must reach
them: without it, dropout would run during evaluation and two scorings of one adapter would differ.

A LoRA student is also saved in PEFT's own format (``to_peft``; written by ``pipeline.adapters`` into
the ``peft/`` subdirectory), so that ``peft.PeftModel.from_pretrained(base, run_dir / "peft")`` loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from pipeline.config import UserError
from pipeline.families.base import decoder_layers
from pipeline.methods import MethodSpec
from pipeline.methods.base import freeze_base

DEFAULTS = MappingProxyType({"r": 16, "alpha": 32, "dropout": 0.05})
KEYS = ("r", "alpha", "dropout", "target_modules")
_MISSING = object()


def targets(model: nn.Module) -> list[str]:
    """Full names of the Linear projections inside each decoder layer's self-attention."""
    wanted = {id(m) for layer in decoder_layers(model) for m in layer.self_attn.children() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if id(m) in wanted]


def _layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class LoraAttachment:
    """PEFT LoRA layers injected into ``model``; ``undo`` (last to first) reverts what else changed."""

    def __init__(self, model: nn.Module, undo: list[Callable[[], None]]):
        self.model, self.undo = model, undo

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if "lora_" in n]

    def tensors(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"LoRA tensors do not fit this model: unexpected {result.unexpected_keys[:4]}")

    @contextmanager
    def disabled(self) -> Iterator[None]:
        layers = _layers(self.model)
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

    def train(self, mode: bool = True) -> None:
        """Only the LoRA modules: the wrapped base layers (and the model) keep their own mode."""
        for layer in _layers(self.model):
            layer.training = mode
            for child in layer.children():
                if child is not layer.base_layer:
                    child.train(mode)

    @property
    def training(self) -> bool:
        return any(layer.training for layer in _layers(self.model))

    def detach(self) -> None:
        """Swap the LoRA layers back for the layers they wrap; drop PEFT's ``peft_config``; restore
        every base parameter's requires_grad."""
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


def peft_config(config: Any, **extra: Any) -> Any:
    """The ``peft.LoraConfig`` of a student's ``lora`` settings: the one ``attach`` injects and the one
    its PEFT export records (so both compute the same layers)."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora["r"], lora_alpha=config.lora["alpha"], lora_dropout=config.lora["dropout"],
                      target_modules=config.lora["target_modules"], **extra)


PEFT_PREFIX = "base_model.model."
"""What ``PeftModel.save_pretrained`` puts before a module's name (``PeftModel.base_model`` is the
``LoraModel``, whose ``model`` is the base model); our tensors are named from the base model itself."""


def to_peft(config: Any, tensors: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """A LoRA student in PEFT's own format: the ``LoraConfig`` ``PeftModel.save_pretrained`` would write
    (inference mode, the base model recorded) and the tensors named as it names them."""
    lora = peft_config(config, base_model_name_or_path=config.base_model or None, inference_mode=True)
    return lora, {PEFT_PREFIX + name: tensor for name, tensor in tensors.items()}


def attach(config: Any, model: nn.Module) -> LoraAttachment:
    from peft import inject_adapter_in_model

    undo = [freeze_base(model)]  # before the injection, so the LoRA parameters keep requires_grad
    previous = model.__dict__.get("peft_config", _MISSING)

    def restore_peft_config() -> None:
        if previous is _MISSING:
            model.__dict__.pop("peft_config", None)
        else:
            model.__dict__["peft_config"] = previous

    undo.append(restore_peft_config)
    lora = peft_config(config)
    attachment = LoraAttachment(model, undo)
    try:
        inject_adapter_in_model(lora, model)
    except BaseException:
        attachment.detach()
        raise
    return attachment


def expected_shapes(config: Any, model: nn.Module | None = None) -> dict[str, tuple[int | None, ...]]:
    """``<target>.lora_A.weight`` (r, in) and ``<target>.lora_B.weight`` (out, r) per target module;
    in and out come from ``model``'s module when a model is given."""
    r = config.lora["r"]
    shapes: dict[str, tuple[int | None, ...]] = {}
    for target in config.lora["target_modules"]:
        d_in = d_out = None
        if model is not None:
            try:
                module = model.get_submodule(target)
            except AttributeError as err:
                raise UserError(f"LoRA target module '{target}' is not in the model; the student was made for "
                                "another model: evaluate it on its base model") from err
            d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if d_in is None or d_out is None:
                raise UserError(f"LoRA target module '{target}' is a {type(module).__name__}, not a Linear layer; "
                                "the student was made for another model")
        shapes[f"{target}.lora_A.weight"] = (r, d_in)
        shapes[f"{target}.lora_B.weight"] = (d_out, r)
    return shapes


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(config: Any) -> str | None:
    lora = config.lora
    missing = [k for k in KEYS if k not in lora]
    if missing:
        return f"'lora' misses {missing}, expected the keys {list(KEYS)}"
    if not (isinstance(lora["r"], int) and not isinstance(lora["r"], bool)) or lora["r"] < 1:
        return f"'lora.r' is {lora['r']!r}, expected a positive integer"
    if not _number(lora["alpha"]) or lora["alpha"] <= 0:
        return f"'lora.alpha' is {lora['alpha']!r}, expected a positive number"
    if not _number(lora["dropout"]) or not 0 <= lora["dropout"] < 1:
        return f"'lora.dropout' is {lora['dropout']!r}, expected a number in [0, 1)"
    names = lora["target_modules"]
    if not isinstance(names, list) or not names or not all(isinstance(t, str) and t for t in names):
        return f"'lora.target_modules' is {names!r}, expected a non-empty list of module names"
    return None


SPEC = MethodSpec(
    name="lora", summary="LoRA (PEFT) on the decoder self-attention projections",
    attach=attach, expected_shapes=expected_shapes, check=check,
    settings=lambda model, variant: {"lora": {**DEFAULTS, "target_modules": targets(model)}},
    describe=lambda config: f"lora r={config.lora['r']}", default_lr=1e-3, default_align="none",
)
