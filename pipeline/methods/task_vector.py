"""Task Vector (Hendel et al., EMNLP Findings 2023): training-free. The residual-stream state at layer L
at the last prompt position, averaged over the store's k-shot ICL prompts of the fitting queries; at
inference the query runs alone and that state is replaced by the vector (``pipeline.vectors``).

It runs its own forwards (one per fitting query, the store's demonstrations): a store holds the
states of its layer target at the query tokens, and the last prompt position is one of them only
with ``--layer-target layer``; reading them from such a store would save those forwards, not the
layer sweep, which generates. L is chosen by the task's metric on the held-out part of the training
queries (every layer tried; the sweep is kept in ``fit.json``). Settings: ``{"layer": L}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.methods import MethodSpec
from pipeline.methods.base import FitData, FitResult, sweep_layers
from pipeline.vectors import Vector, VectorAttachment, mean_layer_states


def _int_in(value: Any, upper: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < upper


def check(config: Any) -> str | None:
    layer = config.settings.get("layer")
    if set(config.settings) != {"layer"} or not _int_in(layer, config.num_layers):
        return (f"'settings' of a Task Vector is {config.settings!r}, expected {{\"layer\": L}} with L in "
                f"0..{config.num_layers - 1}")
    return None


def attach(config: Any, model: nn.Module) -> VectorAttachment:
    return VectorAttachment(model, Vector(config.hidden_size), config.settings["layer"], "replace")


def fit(config: Any, data: FitData) -> FitResult:
    states = mean_layer_states(data.loaded, data.prompts, data.batch_size)  # (L, D)
    model = data.loaded.model

    def attach_at(layer: int) -> VectorAttachment:
        attachment = VectorAttachment(model, Vector(config.hidden_size), layer, "replace")
        attachment.load_tensors({"vector": states[layer].to(data.loaded.device)})
        return attachment

    layers = list(range(config.num_layers))
    best, scores = sweep_layers(data, layers, attach_at, "task vector")
    record = {"method": "tv", "layer": best, "sweep": scores,
              "fitting_prompts": len(data.prompts), "held_out_queries": data.held_out,
              "state_norms": [float(v) for v in states.norm(dim=-1)]}
    return FitResult({"vector": states[best].clone()}, {"layer": best}, record)


SPEC = MethodSpec(
    name="tv", summary="training-free: the mean ICL state at one layer's last prompt position, patched in (Task Vector)",
    attach=attach, build=lambda config: Vector(config.hidden_size), check=check, fit=fit,
    settings=lambda model, variant: {"settings": {"layer": 0}},
    describe=lambda config: f"tv layer {config.settings.get('layer')}",
    default_lr=0.0, default_align="none",
)
