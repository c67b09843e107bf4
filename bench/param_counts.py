"""Trainable parameters of every built-in student method on the paper's models, next to the papers'
figures (docs/architecture.md §1).

Models are built on the meta device from the real architectures of ``pipeline/configs/models/*.yaml``
(no weights, no memory, no download); each method's tensors are counted from its ``MethodSpec.shapes``
with the settings a fresh ``train-student`` run records, so the counts are those of saved adapters.

    python bench/param_counts.py            # markdown table on stdout
    python bench/param_counts.py --json     # the same numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("idefics-9b", "idefics2-8b")
METHODS = ("mimic", "live", "lora", "hificl", "mimic-lora", "tv", "fv")
PAPER = {("mimic", "idefics-9b"): "0.26M (MimIC paper)", ("hificl", "idefics-9b"): "2.2M (HiFICL paper)"}
"""The figures the papers report, by (method, model)."""


def meta_model(alias: str):
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pipeline.config import CONFIGS_DIR

    data = yaml.safe_load((CONFIGS_DIR / "models" / f"{alias}.yaml").read_text())
    config = AutoConfig.for_model(data["model_type"], **data["architecture"])
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def counts() -> list[dict]:
    from pipeline.adapters import AdapterConfig
    from pipeline.families import attention_geometry
    from pipeline.methods import get_method

    rows = []
    for alias in MODELS:
        model = meta_model(alias)
        g = attention_geometry(model)
        for method in METHODS:
            spec = get_method(method)
            settings = {"variant": "mimic", **spec.settings(model, "mimic")}
            config = AdapterConfig(method=method, num_layers=g.num_layers, num_heads=g.num_heads, head_dim=g.head_dim,
                                   hidden_size=g.hidden_size, **settings)
            variants = [config]
            if method == "hificl":  # the rank of the HiFICL class's own default, beside the recipe's
                variants.append(replace(config, lora={**config.lora, "rank": 4}))
            for c in variants:
                shapes = spec.shapes(c, model)
                rows.append({"model": alias, "method": method, "describe": c.describe(),
                             "params": sum(math.prod(s) for s in shapes.values()),
                             "paper": PAPER.get((method, alias), "") if c is config else ""})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | settings | " + " | ".join(MODELS) + " | paper |", "|---|---|" + "---:|" * len(MODELS) + "---|"]
    keys = list(dict.fromkeys((r["method"], r["describe"]) for r in rows))
    for method, describe in keys:
        by_model = {r["model"]: r for r in rows if (r["method"], r["describe"]) == (method, describe)}
        cells = [f"{by_model[m]['params']:,}" for m in MODELS]
        paper = "; ".join(f"{r['paper']}" for r in by_model.values() if r["paper"])
        lines.append(f"| {method} | {describe} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    args = parser.parse_args()
    rows = counts()
    print(json.dumps(rows, indent=2) if args.json else table(rows))


if __name__ == "__main__":
    main()
