"""Student methods as plug-ins: one module per method — its parameters, how it attaches to a model,
its defaults — behind one registry (as peft's ``tuners/<method>/`` with its method registry).

A method is a ``MethodSpec``. The built-in ones (``mimic``, ``live``, ``lora``, ``hificl``,
``mimic-lora``; the training-free ``tv`` and ``fv``) live in this package and are imported only when asked for. Another package adds one
without touching this project: through the entry-point group ``mimic_pipeline.methods`` (entry name =
method name, value = ``module:SPEC``), or by calling ``register_method(spec)`` before the stages run.
Training, saving, loading and evaluation then treat it like a built-in: ``pipeline train-student
--method NAME``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from pipeline.config import UserError

ENTRY_POINT_GROUP = "mimic_pipeline.methods"
BUILTIN = MappingProxyType(
    {"mimic": "pipeline.methods.mimic", "live": "pipeline.methods.live", "lora": "pipeline.methods.lora",
     "hificl": "pipeline.methods.hificl", "mimic-lora": "pipeline.methods.mimic_lora",
     "tv": "pipeline.methods.task_vector", "fv": "pipeline.methods.function_vector"})
"""Built-in method name -> module holding its ``SPEC`` (imported on first use: torch and PEFT stay
unimported for ``--help``)."""


class Attachment(Protocol):
    """A method's parameters attached to a model (what ``MethodSpec.attach`` returns)."""

    training: bool

    def trainable(self) -> list[tuple[str, Any]]: ...
    def tensors(self) -> dict[str, Any]: ...
    def load_tensors(self, tensors: dict[str, Any]) -> None: ...
    def disabled(self) -> AbstractContextManager[None]: ...
    def train(self, mode: bool = True) -> None: ...
    def detach(self) -> None: ...


@dataclass(frozen=True)
class MethodSpec:
    """One student method.

    name: what ``--method`` and ``adapter_config.json`` call it. summary: one line for ``--help``.
    attach(config, model): fresh parameters for the ``AdapterConfig`` attached to ``model`` (the base
    model frozen; the identity at step 0 where the method allows); returns an ``Attachment``.
    build(config): the parameter module alone (None for methods whose parameters live inside the
    model, like LoRA); gives ``expected_shapes`` by default. expected_shapes(config, model): tensor
    name -> shape (``None`` for a size only the model knows), checked on every load.
    settings(model, variant): the method's own entries of its ``AdapterConfig`` (e.g. ``variant``,
    ``lora``). check(config): what is wrong with those entries, or None. describe(config): a short
    name for messages. default_lr / default_align: the defaults of ``train-student``.
    param_lr(train_config, lr, name): the learning rate of the trainable parameter ``name`` (as
    ``Attachment.trainable`` names it) given the run's ``TrainConfig`` and its resolved ``--lr``; None
    (the default): ``lr`` for every parameter. For methods of several parts (``mimic-lora``); the
    optimiser makes one group per learning rate (and per weight decay).
    fit(config, data): for training-free methods (Task Vector, Function Vector), computes the student from
    the model's own forwards instead of an optimiser: ``data`` is a ``pipeline.methods.base.FitData``,
    the result a ``FitResult`` (tensors, settings, record); ``attach`` then builds it from the settings.
    """

    name: str
    summary: str
    attach: Callable[[Any, Any], Attachment]
    build: Callable[[Any], Any] | None = None
    expected_shapes: Callable[[Any, Any], dict[str, tuple[int | None, ...]]] | None = None
    settings: Callable[[Any, str], dict[str, Any]] = field(default=lambda model, variant: {})
    check: Callable[[Any], str | None] = field(default=lambda config: None)
    describe: Callable[[Any], str] = field(default=lambda config: config.method)
    default_lr: float = 5e-3
    default_align: str = "mse"
    param_lr: Callable[[Any, float, str], float] | None = None
    fit: Callable[[Any, Any], Any] | None = None

    def shapes(self, config: Any, model: Any = None) -> dict[str, tuple[int | None, ...]]:
        """``expected_shapes``, or the state dict of ``build(config)`` made on the meta device (no
        memory, no random numbers drawn)."""
        if self.expected_shapes is not None:
            return self.expected_shapes(config, model)
        if self.build is None:
            raise TypeError(f"method {self.name}: give build or expected_shapes")
        import torch

        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in self.build(config).state_dict().items()}


class UnknownMethodError(UserError):
    """A method name that is neither built in, registered, nor an installed entry point."""


class MethodRegistry:
    """Name -> ``MethodSpec``: built-ins and entry points resolved on first use."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}

    def register(self, spec: MethodSpec) -> MethodSpec:
        held = self._specs.get(spec.name)
        if held is not None and held is not spec:
            raise ValueError(f"a method named {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> MethodSpec:
        if name in self._specs:
            return self._specs[name]
        if name in BUILTIN:
            return self.register(importlib.import_module(BUILTIN[name]).SPEC)
        entry = next((ep for ep in _entry_points() if ep.name == name), None)
        if entry is None:
            raise UnknownMethodError(f"unknown student method {name!r}; available: {', '.join(self.names())} "
                                     f"(a package adds one through the entry-point group {ENTRY_POINT_GROUP})")
        spec = entry.load()
        if not isinstance(spec, MethodSpec) or spec.name != name:
            raise UnknownMethodError(f"entry point {entry.value} of {ENTRY_POINT_GROUP} names method {name!r} "
                                     "but does not hold a MethodSpec of that name")
        return self.register(spec)

    def names(self) -> list[str]:
        return sorted({*BUILTIN, *self._specs, *(ep.name for ep in _entry_points())})

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


REGISTRY = MethodRegistry()


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` available to every stage of this process; returns it."""
    return REGISTRY.register(spec)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; ``UnknownMethodError`` (one line, listing the methods) otherwise."""
    return REGISTRY.get(name)
