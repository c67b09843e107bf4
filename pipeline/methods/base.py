"""What methods share: freezing the base model, a switch that turns a student off for base-model
forwards, and the attachment of methods whose parameters form one module outside the model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Switch:
    """Shared by every hook or layer of one attachment: one flag turns the whole student on or off."""

    enabled: bool = True


class StudentHandle:
    """A student attached to a model: ``detach()``, ``enable()``, ``disable()``, ``disabled()``.
    ``undo`` holds what to run (last to first) to remove every trace of it."""

    def __init__(self, model: nn.Module, switch: Switch, undo: list[Callable[[], None]]):
        self.model = model
        self._switch = switch
        self._undo = undo

    @property
    def enabled(self) -> bool:
        return self._switch.enabled

    def enable(self) -> None:
        self._switch.enabled = True

    def disable(self) -> None:
        self._switch.enabled = False

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: ``with handle.disabled(): model(**batch)``."""
        previous = self._switch.enabled
        self._switch.enabled = False
        try:
            yield
        finally:
            self._switch.enabled = previous

    def detach(self) -> None:
        """Remove every trace of the student; the model is the base model again, requires_grad flags
        included."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def freeze_base(model: nn.Module) -> Callable[[], None]:
    """Set requires_grad False on every parameter of ``model``; returns the function that puts each
    flag back as it was (on CPU the flag can change which ``F.linear`` kernel runs, so the base model
    is only bit-identical to itself with the same flags: docs/architecture.md §1)."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)

    def restore() -> None:
        for p, flag in previous:
            p.requires_grad_(flag)

    return restore


class ModuleAttachment:
    """A method whose parameters are one ``module`` outside the model, acting through ``handle``
    (hooks or the attention function): the ``Attachment`` of MimIC, LIVE and most plug-ins."""

    def __init__(self, module: nn.Module, handle: StudentHandle):
        self.module, self.handle = module, handle

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.named_parameters())

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(tensors)

    def disabled(self):
        return self.handle.disabled()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def training(self) -> bool:
        return self.module.training

    def detach(self) -> None:
        self.handle.detach()


def attach_output_hooks(model: nn.Module, module: nn.Module, targets: Sequence[nn.Module],
                        shift: Callable[[int, torch.Tensor], torch.Tensor]) -> ModuleAttachment:
    """Freeze ``model`` and add ``shift(i, output)`` to the output of ``targets[i]`` through forward
    hooks (LIVE on each decoder layer's MLP; a plug-in on any submodules). ``module`` holds the
    parameters; it moves to the model's device."""
    module.to(next(model.parameters()).device)
    switch, undo = Switch(), [freeze_base(model)]
    for i, target in enumerate(targets):

        def hook(_module, _args, output, i=i):
            return shift(i, output) if switch.enabled else output

        undo.append(target.register_forward_hook(hook).remove)
    return ModuleAttachment(module, StudentHandle(model, switch, undo))


@dataclass
class FitData:
    """What a training-free method (``MethodSpec.fit``) fits on, built by ``pipeline train-student`` from
    the teacher store: the store's queries with the store's demonstrations, split into a fitting part and a
    held-out part of the training split (never the evaluation split).

    loaded: the model (``pipeline.runtime.Loaded``). prompts: k-shot ICL prompts of the fitting queries,
    their answers teacher-forced. shuffled: the same prompts with the demonstrations' answers permuted
    (no demonstration keeps its own), for Function Vector's causal indirect effects. score(attachment):
    the task's metric on the held-out queries, run alone (zero-shot prompts, greedy generation) with
    that attachment on the model. batch_size: forwards per batch. progress(total, desc): a progress bar.
    """

    loaded: Any
    prompts: list[Any]
    shuffled: list[Any]
    score: Callable[[Any], float]
    batch_size: int
    progress: Callable[[int, str], Any]
    held_out: int = 0


@dataclass
class FitResult:
    """A fitted student: its tensors, its ``adapter_config.json`` settings, and a record of how it was
    chosen (written to the run's ``fit.json``)."""

    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]
    record: dict[str, Any]


def sweep_layers(data: FitData, layers: Sequence[int], attach: Callable[[int], Any], what: str) -> tuple[int, list[float]]:
    """(best layer, held-out score of each layer of ``layers``): ``attach(layer)`` puts the student on the
    model at that layer, ``data.score`` measures it, then it is detached. Ties go to the earlier layer."""
    scores = []
    progress = data.progress(len(layers), f"{what}: layer sweep")
    for layer in layers:
        attachment = attach(layer)
        try:
            scores.append(float(data.score(attachment)))
        finally:
            attachment.detach()
        progress.update(1)
    progress.close()
    best = max(range(len(layers)), key=lambda i: (scores[i], -i))
    return layers[best], scores
