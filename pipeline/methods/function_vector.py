"""Function Vector (Todd et al., ICLR 2024): training-free. Each attention head's mean output at the last
prompt position over the store's k-shot ICL prompts; each head's causal indirect effect (CIE) on ICL
prompts with shuffled demonstration answers; the FV is the sum of the top-k heads' mean outputs through
their ``o_proj`` columns, added to the residual stream at layer L at the last prompt position
(``pipeline.vectors``: head outputs read and patched through the attention function MimIC uses).

k = 10 (the paper's choice for its smaller models), CIE over at most 25 shuffled prompts (the paper's
25 trials), L chosen by the task's metric on the held-out part of the training queries (every layer
tried). ``fit.json`` keeps the CIE of every head, the heads chosen and the sweep. Settings:
``{"layer": L, "heads": [[layer, head], ...]}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.config import UserError
from pipeline.methods import MethodSpec
from pipeline.methods.base import FitData, FitResult, sweep_layers
from pipeline.vectors import (
    Vector,
    VectorAttachment,
    causal_indirect_effects,
    function_vector,
    mean_head_outputs,
    top_heads,
)

TOP_HEADS = 10
CIE_PROMPTS = 25


def _int_in(value: Any, upper: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < upper


def check(config: Any) -> str | None:
    s = config.settings
    expected = (f"expected {{\"layer\": L, \"heads\": [[layer, head], ...]}} with layers in 0..{config.num_layers - 1} "
                f"and heads in 0..{config.num_heads - 1}")
    if set(s) != {"layer", "heads"} or not _int_in(s.get("layer"), config.num_layers) or not isinstance(s.get("heads"), list):
        return f"'settings' of a Function Vector is {s!r}, {expected}"
    for pair in s["heads"]:
        if not (isinstance(pair, list) and len(pair) == 2 and _int_in(pair[0], config.num_layers)
                and _int_in(pair[1], config.num_heads)):
            return f"'settings.heads' of a Function Vector holds {pair!r}, {expected}"
    return None


def attach(config: Any, model: nn.Module) -> VectorAttachment:
    return VectorAttachment(model, Vector(config.hidden_size), config.settings["layer"], "add")


def fit(config: Any, data: FitData) -> FitResult:
    loaded = data.loaded
    if not data.shuffled:
        raise UserError("--method fv needs a store of at least 2 shots (its head effects are measured on prompts whose "
                        "demonstrations' answers are shuffled); cache one with `pipeline teacher-cache --shots 8`")
    means = mean_head_outputs(loaded, data.prompts, data.batch_size)  # (L, H, Dh)
    shuffled = data.shuffled[:CIE_PROMPTS]
    progress = data.progress(len(shuffled), "function vector: causal indirect effects")
    cie = causal_indirect_effects(loaded, shuffled, means, progress=progress)
    progress.close()
    heads = top_heads(cie, min(TOP_HEADS, cie.numel()))
    vector = function_vector(loaded.model, means, heads)

    def attach_at(layer: int) -> VectorAttachment:
        attachment = VectorAttachment(loaded.model, Vector(config.hidden_size), layer, "add")
        attachment.load_tensors({"vector": vector.to(loaded.device)})
        return attachment

    layers = list(range(config.num_layers))
    best, scores = sweep_layers(data, layers, attach_at, "function vector")
    record = {"method": "fv", "layer": best, "heads": [list(h) for h in heads], "top_k": len(heads),
              "cie": cie.tolist(), "cie_prompts": len(shuffled), "fitting_prompts": len(data.prompts),
              "held_out_queries": data.held_out, "sweep": scores,
              "vector_norm": float(vector.norm())}
    return FitResult({"vector": vector}, {"layer": best, "heads": [list(h) for h in heads]}, record)


SPEC = MethodSpec(
    name="fv", summary="training-free: the top-10 heads' mean outputs by causal effect, added at one layer (Function Vector)",
    attach=attach, build=lambda config: Vector(config.hidden_size), check=check, fit=fit,
    settings=lambda model, variant: {"settings": {"layer": 0, "heads": []}},
    describe=lambda config: f"fv layer {config.settings.get('layer')}, {len(config.settings.get('heads', []))} heads",
    default_lr=0.0, default_align="none",
)
