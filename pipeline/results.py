"""The results folder ``results/<task>/`` of `pipeline evaluate`: the names of its files and how a result
JSON is recognised. The evaluate stage writes them (``stages.evaluation.ResultsFolder``); `pipeline
inspect` reads them; both take the names from here.

    <name>[@<settings>].json     one mode or run: score, settings, fingerprint, every record
    <name>[@<settings>].partial.jsonl   records of an interrupted evaluation (a header line first)
    table.md                     every result, grouped by settings (first line: ``TABLE_MARK``)
    l2_*.png                     the L2 analysis plots (PNG text chunk ``PNG_MARK``)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_KIND = "mimic-evaluation"
"""``kind`` of a results JSON (and of a partial file's header) written by `pipeline evaluate`."""
RESULTS_SCHEMA_VERSION = 1
SCHEMA_KEY = "results_schema_version"
"""Written into every result JSON; a result of a newer schema is refused by name, not misread."""
PARTIAL_SUFFIX = ".partial.jsonl"
TABLE_FILE = "table.md"
TABLE_MARK = "<!-- written by `pipeline evaluate`; rewritten on every run: edits here are lost -->"
"""First line of ``table.md``: the file is ours to rewrite."""
PNG_MARK = ("Software", "pipeline evaluate")
"""PNG text chunk of an L2 plot: the file is ours to rewrite."""


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def is_result(data: Any) -> bool:
    """A results payload written by `pipeline evaluate` (its ``kind``) with every field the table shows."""
    if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
        return False
    numbers = ("score", "n", "mean_latency_ms", "mean_prompt_tokens")
    return (all(isinstance(data.get(k), str) for k in ("name", "mode", "metric"))
            and all(isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool) for k in numbers))
