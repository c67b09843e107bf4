"""Regenerate the built-in text tasks' JSONL files: ``python pipeline/configs/tasks/words/build.py``.

Deterministic (no randomness but one seeded sample); every line is ``{"id", "input", "answer"}``.
Pairs are curated to have one canonical answer (ambiguous items such as "right" or "old" as inputs,
or verbs with two past forms such as "learn", are left out) since the metric is exact match.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRED = ("antonyms", "past_tense", "plurals")
"""Tasks whose pairs are curated by hand in ``pairs/<task>.txt`` (``input:answer`` items, comma-separated)."""


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_in_words(n: int) -> str:
    """American English words for 0 <= n < 1000, e.g. 342 -> 'three hundred forty-two'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_in_words(rest))


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'a:b, c:d' -> [(a, b), (c, d)]; later duplicates of an input are dropped."""
    seen: dict[str, str] = {}
    for item in text.replace("\n", " ").split(","):
        source, target = (part.strip() for part in item.split(":"))
        seen.setdefault(source, target)
    return list(seen.items())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def rows(task: str, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"id": f"{task}-{slug(a)}", "input": a, "answer": b} for a, b in pairs]


def build() -> dict[str, list[dict[str, str]]]:
    numbers = sorted(random.Random(0).sample(range(1000), 400))
    return {
        **{task: rows(task, parse_pairs((HERE / "pairs" / f"{task}.txt").read_text())) for task in PAIRED},
        "number_words": rows("number_words", [(number_in_words(n), str(n)) for n in numbers]),
    }


def main() -> None:
    for task, items in build().items():
        ids = [r["id"] for r in items]
        if len(set(ids)) != len(ids):
            raise SystemExit(f"{task}: duplicate ids")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
        (HERE / f"{task}.jsonl").write_text(lines)
        print(f"{task}: {len(items)} examples")


if __name__ == "__main__":
    main()
