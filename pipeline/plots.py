"""PNG plots (matplotlib, Agg backend): the training loss curve and per-layer L2 distances."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss, its parts and the learning rate per optimiser step from ``train_log.jsonl``."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()] if Path(log_path).exists() else []
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for key, style in (("loss", "-"), ("align", "--"), ("gt", ":")):
        if any(r.get(key) is not None for r in rows):
            ax.plot(steps, [r.get(key) for r in rows], style, label=key)
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimiser step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def plot_layer_distances(curves: dict[str, list[float]], png_path: str | Path, title: str = "") -> Path:
    """One line per method: mean L2 distance to the ICL teacher's states at each layer."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 distance to k-shot ICL states")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
