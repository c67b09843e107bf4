"""Where a data or task file is broken, in one line: the file, the line and what is wrong there.

The ``datasets`` readers report a broken JSON file as "Expected object or value at position 27" and
an empty one as a bare ``StopIteration``; these helpers look at the file again (only after a read
failed, so a good file is never parsed twice) and name the first line that is at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import UserError


def read_text(path: Path) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are a ``UserError`` naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{path} line {line}: not UTF-8 text (byte {err.start} is {data[err.start : err.start + 1]!r}); "
            "save the file with UTF-8 encoding"
        ) from err


def json_kind(value: Any) -> str:
    """How a JSON value is called in messages: ``a JSON object``, ``a JSON array``, ``a number``..."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else f"a {type(value).__name__}"


def _line_faults(text: str) -> str | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: invalid JSON ({err.msg} at column {err.colno}); each line must hold one JSON object"
        if not isinstance(record, dict):
            return f"line {number}: {json_kind(record)}, expected one JSON object per line"
    return None


def json_fault(path: Path, lines: bool = True) -> str | None:
    """``line N: ...`` (or ``record N: ...``) for the first broken record of a JSON / JSON Lines file.

    ``empty`` when the file holds no record at all; None when no fault is found (the reader failed
    for another reason, e.g. a column whose type changes between rows). ``lines=False``: the file
    must be one JSON document (no JSON Lines).
    """
    text = read_text(path)
    if not text.strip():
        return "empty"
    start = text.lstrip()[0]
    if start in "[{" or not lines:  # one JSON document (an array of records), or JSON Lines
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if not lines or start == "[" or err.msg != "Extra data":  # "Extra data": JSON Lines
                return f"line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
        else:
            if isinstance(whole, list):
                if not whole:
                    return "empty"
                for i, record in enumerate(whole, start=1):
                    if not isinstance(record, dict):
                        return f"record {i}: {json_kind(record)}, expected a JSON object per record"
            return None
    return _line_faults(text)
