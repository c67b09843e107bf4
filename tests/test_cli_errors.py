"""Command-line parse errors (a bad value for a typed option, an unknown option or command, a missing
argument or value, a bad choice) as a user meets them: one line on stderr naming the option and what is
valid, exit 2, no traceback, no usage block, no boxed panel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a narrow terminal: a Rich panel, if one were drawn, would be drawn here
ENV = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
BOX = set("─│╭╮╰╯┌┐└┘├┤┬┴┼━┃")
ENTRY = "from pipeline.cli import app; app(prog_name='pipeline')"  # as the `pipeline` console script runs


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


CASES = [
    (  # a typed option given a value of another type
        ("train-student", "--lr", "abc"),
        "error: pipeline train-student: --lr: 'abc' is not a valid float; see pipeline train-student --help",
    ),
    (
        ("evaluate", "--n-queries", "2.5"),
        "error: pipeline evaluate: --n-queries: '2.5' is not a valid integer; see pipeline evaluate --help",
    ),
    (
        ("train-student", "--bogus", "1"),
        "error: pipeline train-student: unknown option --bogus; see pipeline train-student --help",
    ),
    (  # a near miss names the options it may have meant
        ("train-student", "--lrr", "1"),
        "error: pipeline train-student: unknown option --lrr (did you mean --lora-lr or --lr?); "
        "see pipeline train-student --help",
    ),
    (
        ("inspect",),
        "error: pipeline inspect: missing argument STORE|RUN; see pipeline inspect --help",
    ),
    (
        ("teacher-cache", "--shots"),
        "error: pipeline teacher-cache: --shots: needs a value; see pipeline teacher-cache --help",
    ),
    (
        ("trian-student",),
        "error: pipeline: No such command 'trian-student'; did you mean 'train-student'?; see pipeline --help",
    ),
    (
        ("distill",),
        "error: pipeline: No such command 'distill' (commands: teacher-cache, train-student, evaluate, inspect, "
        "demo); see pipeline --help",
    ),
    (
        ("--bogus",),
        "error: pipeline: unknown option --bogus; see pipeline --help",
    ),
]


@pytest.mark.parametrize(("args", "line"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_parse_error_is_one_line(args, line):
    res = run(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and not BOX & set(res.stderr), res.stderr
    assert res.stderr.splitlines() == [line]


def test_bad_choice_is_one_line_naming_the_choices():
    """Choices are checked with the other option values (``pipeline.config``): the same one line, exit 2."""
    res = run("evaluate", "--split", "dev")
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr and not BOX & set(res.stderr), res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("error: ") and "'split': got 'dev'" in line and "support, train, eval" in line


def test_help_version_and_bare_command_are_unchanged():
    """What is not an error still prints as before: help (boxed by Rich), the version, and the bare
    command's help."""
    top = run("--help")
    assert top.returncode == 0 and "train-student" in top.stdout and BOX & set(top.stdout)
    assert run("--version").stdout.strip().startswith("mimic-pipeline ")
    bare = run()
    assert "Usage" in bare.stdout + bare.stderr and "error:" not in bare.stderr
