"""`python -m pipeline ...` (what `accelerate launch -m pipeline` runs)."""

from pipeline.cli import app

app()
