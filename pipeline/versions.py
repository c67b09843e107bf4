"""The versions of what made a teacher store or a run: this tool, Python and the libraries that decide
the numbers. Recorded (a store's ``code_version``, a run's ``summary.json``), never compared: a library
upgrade must not make every store stale (docs/architecture.md §4)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform

LIBRARIES = ("torch", "transformers", "peft", "zarr")


def library_versions() -> dict[str, str | None]:
    """``{"mimic-pipeline": ..., "python": ..., "torch": ..., ...}``; None for a library not installed.

    Read from the installed distributions' metadata (nothing is imported), once per process."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str | None]:
    from pipeline import __version__

    versions: dict[str, str | None] = {"mimic-pipeline": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
