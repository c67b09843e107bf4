"""Hours of the paper's grid on one GPU, projected from measured rates (no model runs here).

    python bench/projection.py --suite idefics2-8b=results/idefics2/suite.json \\
        --eval-batch idefics2-8b=results/eval_batch/eval_batch.json [--suite idefics-9b=... ...] \\
        --out results/projection.md

Inputs are the JSON reports of ``bench/suite.py`` (sections stage1 and stage2) and ``bench/eval_batch.py``
for each model, measured on the GPU the projection is for. Grid: each model x VQAv2 (10,000 val questions),
OK-VQA (5,046), COCO Karpathy test (5,000) x {zero-shot, 32-shot ICL, MimIC, LIVE, LoRA}, the teacher on
1,000 queries, training for the model's epochs (Idefics2 5, Idefics-9B 10, ``pipeline/configs/models``).

Two designs:
- **this tool**: stage 1 once per task (``teacher-cache + store samples/s (end to end)``), training offline
  from the store (``offline samples/s (steady, median step)``), evaluation at the best batch of
  ``eval_batch.py`` for each mode;
- **official**: no stage 1, the teacher runs in every training step (``online samples/s (steady, median
  step)``, the tool's ``--online`` on the same harness), evaluation at batch 16.

Assumptions, printed with the table: LIVE and LoRA train at MimIC's measured rate (only MimIC is measured);
the evaluation rates of 10-token VQA answers are used for captions too, at half the rate (20 new tokens);
32-shot ICL is evaluated at the 32-shot rate of ``eval_batch.py`` (for Idefics-9B that is its paper setting,
for Idefics2 the paper uses 8 shots: pass ``--icl-shots 8`` to project that instead).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = {"VQAv2": (10_000, 1.0), "OK-VQA": (5_046, 1.0), "COCO": (5_000, 0.5)}
"""Evaluated queries and the rate factor (captions: 20 new tokens against VQA's 10)."""
TEACHER_QUERIES = 1000
EPOCHS = {"idefics2-8b": 5, "idefics-9b": 10}
OFFICIAL_EVAL_BATCH = 16


def rows_of(path: str) -> dict:
    return json.loads(Path(path).read_text())["rows"]


def value(rows: dict, name: str) -> float | None:
    row = rows.get(name)
    return None if row is None or not row.get("value") else float(row["value"])


def suite_eval_rates(rows: dict, icl_shots: int, prefix: str = "B4 ") -> dict[str, dict]:
    """Without an ``eval_batch.py`` report: the suite's batched inference figures (``B4 ... ms/query``,
    3 beams, 10 tokens) as each mode's rate, for both designs (the batch-16 rate is then not measured)."""
    names = {"zero-shot": "zero-shot", "student": "MimIC student", "icl": f"{icl_shots}-shot ICL"}
    out = {}
    for mode, name in names.items():
        ms = value(rows, f"{prefix}{name} ms/query")
        if ms:
            batch = int(prefix.strip()[1:]) if prefix.strip().startswith("B") else 1
            out[mode] = {"best": (batch, 1e3 / ms), OFFICIAL_EVAL_BATCH: 1e3 / ms, "from_suite": True}
    return out


def eval_rates(path: str, icl_shots: int) -> dict[str, dict]:
    """mode -> {"best": (batch, queries/s), 16: queries/s at batch 16 if measured}."""
    extra = json.loads(Path(path).read_text())["extra"]["rows"]
    names = {"zero-shot": "zero-shot", "student": "MimIC student", "icl": f"{icl_shots}-shot ICL"}
    out = {}
    for mode, name in names.items():
        fit = [r for r in extra.get(name, []) if not r.get("oom")]
        if not fit:
            continue
        best = max(fit, key=lambda r: r["queries_per_s"])
        at16 = next((r["queries_per_s"] for r in fit if r["batch"] == OFFICIAL_EVAL_BATCH), None)
        out[mode] = {"best": (best["batch"], best["queries_per_s"]), OFFICIAL_EVAL_BATCH: at16}
    return out


def hours(n: float, rate: float | None) -> float | None:
    return None if not rate else n / rate / 3600


def fmt(h: float | None) -> str:
    return "-" if h is None else f"{h:.2f}"


def project(model: str, suite: dict, evals: dict, icl_shots: int) -> list[str]:
    teacher_rate = value(suite, "teacher-cache + store samples/s (end to end)")
    offline = value(suite, "offline samples/s (steady, median step)")
    online = value(suite, "online samples/s (steady, median step)")
    epochs = EPOCHS.get(model, 5)
    lines = []
    for task, (n_eval, factor) in TASKS.items():
        for mode in ("zero-shot", "icl", "MimIC", "LIVE", "LoRA"):
            trained = mode in ("MimIC", "LIVE", "LoRA")
            rate = evals.get("student" if trained else mode, {})
            tool_eval = hours(n_eval, rate["best"][1] * factor) if rate else None
            official_eval = hours(n_eval, (rate.get(OFFICIAL_EVAL_BATCH) or 0) * factor) if rate else None
            teacher = hours(TEACHER_QUERIES, teacher_rate) if mode == "MimIC" else None  # LIVE/LoRA: no teacher states
            tool_train = hours(epochs * TEACHER_QUERIES, offline) if trained else None
            official_train = hours(epochs * TEACHER_QUERIES, online if mode == "MimIC" else offline) if trained else None
            tool_parts = [tool_eval] + ([tool_train] if trained else []) + ([teacher] if mode == "MimIC" else [])
            official_parts = [official_eval] + ([official_train] if trained else [])
            tool_total = None if None in tool_parts else sum(tool_parts)  # a part not measured: no total
            official_total = None if None in official_parts else sum(official_parts)
            label = f"{icl_shots}-shot ICL" if mode == "icl" else mode
            best = f" (B{rate['best'][0]})" if rate else ""
            lines.append(f"| {model} | {task} | {label} | {fmt(teacher)} | {fmt(tool_train)} | {fmt(tool_eval)}{best} | "
                         f"{fmt(tool_total)} | {fmt(official_train)} | {fmt(official_eval)} | {fmt(official_total)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", action="append", default=[], help="MODEL=suite.json (sections stage1, stage2)")
    ap.add_argument("--eval-batch", action="append", default=[], help="MODEL=eval_batch.json")
    ap.add_argument("--icl-shots", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], help="MODEL:FIGURE=VALUE, a figure from elsewhere")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    suites: dict[str, dict] = {}
    for s in args.suite:  # several reports of one model: rows merged, a later report's figures win
        model, path = s.split("=", 1)
        suites.setdefault(model, {}).update(rows_of(path))
    given = []
    for s in args.set:  # MODEL:FIGURE=VALUE, a figure measured elsewhere (named in the notes below the table)
        key, val = s.rsplit("=", 1)
        model, figure = key.split(":", 1)
        suites.setdefault(model, {})[figure] = {"value": float(val)}
        given.append(f"{model}: {figure} = {val}")
    evals = dict(s.split("=", 1) for s in args.eval_batch)
    lines = [
        "| model | task | mode | teacher h | train h | eval h (tool batch) | tool total h | official train h "
        f"(teacher each step) | official eval h (B{OFFICIAL_EVAL_BATCH}) | official total h |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    from_suite = []
    for model, rows in suites.items():
        rates = eval_rates(evals[model], args.icl_shots) if model in evals else suite_eval_rates(rows, args.icl_shots)
        if model not in evals and rates:
            from_suite.append(model)
        lines += project(model, rows, rates, args.icl_shots)
    lines += ["", "Assumptions: LIVE and LoRA train at MimIC's offline rate (and need no teacher); captions "
              "evaluate at half the VQA rate (20 new tokens); '-' = not measured."]
    if from_suite:
        lines.append(f"Evaluation of {', '.join(from_suite)}: the suite's batch-4 inference figures (no eval_batch.py "
                     "report), the same rate for both designs (the official batch 16 not measured).")
    if given:
        lines.append("Figures given on the command line (--set): " + "; ".join(given) + ".")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
