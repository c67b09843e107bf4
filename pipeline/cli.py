"""The `pipeline` command: thin Typer app; parse, load config, call ``stages.*.run``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pipeline",
    help="MimIC: cache k-shot ICL teacher states once, train tiny per-head students, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _not_built(name: str) -> None:
    typer.echo(f"error: `pipeline {name}` is not built yet", err=True)
    raise typer.Exit(2)


@app.command("teacher-cache")
def teacher_cache() -> None:
    """Stage 1: run k-shot ICL once and cache per-layer query states in a Zarr store."""
    _not_built("teacher-cache")


@app.command("train-student")
def train_student() -> None:
    """Stage 2: train a MimIC (or baseline) student against a teacher store."""
    _not_built("train-student")


@app.command("evaluate")
def evaluate() -> None:
    """Compare zero-shot, k-shot ICL and trained students with the official metrics."""
    _not_built("evaluate")
