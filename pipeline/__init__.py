"""MimIC pipeline: distil many-shot in-context learning into per-head attention shifts.

Paper: Jiang et al., "Mimic In-Context Learning for Multimodal Tasks", CVPR 2025 (arXiv 2504.08851).

The Python API (README "Python API"): ``load_base_model`` loads a model as the CLI does,
``Student.from_pretrained`` attaches a saved student (a run directory or a Hub id). Importing this
package stays light (no torch): the names below are imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Student", "load_base_model", "load_student_dir", "new_student"]

_LAZY = {"Student": "pipeline.students", "load_student_dir": "pipeline.students", "new_student": "pipeline.students"}


def load_base_model(name: str, device: str = "auto", dtype: str = "auto", revision: str | None = None,
                    trust_remote_code: bool = False) -> Any:
    """The model ``name`` (an alias such as ``smollm2-135m``, a hub id or a directory) loaded as every
    ``pipeline`` command loads it: its language model's attention routed through MimIC's function, in
    eval mode on ``device`` (``auto``: the GPU when there is one) in ``dtype`` (``auto``: bfloat16 on
    CUDA, float32 on CPU). Returns a ``pipeline.runtime.Loaded``: ``model``, ``processor`` (the
    tokenizer of a text model), ``family``, ``source`` (name, revision, fingerprint), ``device``."""
    from pipeline.runtime import load_for_stage

    return load_for_stage(name, device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
