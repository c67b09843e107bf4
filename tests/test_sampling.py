"""Demonstration sampler: determinism, exclusion of the query, no replacement, call-order independence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT, UserError
from pipeline.tasks.base import Example
from pipeline.tasks.sampling import STRATEGIES, sample_demonstrations


def pool(n: int) -> list[Example]:
    return [Example(id=f"q{i}", question=f"question {i}", answers=(f"a{i}",)) for i in range(n)]


class CountingPool(list):
    """A support split that counts element reads (the real ones build an Example per read)."""

    reads = 0

    def __getitem__(self, index):
        CountingPool.reads += 1
        return super().__getitem__(index)


def test_same_inputs_same_demonstrations():
    support = pool(50)
    first = sample_demonstrations(support, support[3], 8, seed=7)
    assert first == sample_demonstrations(support, support[3], 8, seed=7)
    assert len(first) == 8


def test_query_excluded_and_no_replacement():
    support = pool(12)
    for seed in range(200):
        for q in (0, 5, 11):
            picked = sample_demonstrations(support, support[q], 11, seed=seed)
            assert len(set(picked)) == 11, "drawn with replacement"
            assert q not in picked, "the query itself was drawn"
            assert sorted(picked) == [i for i in range(12) if i != q]


def test_query_outside_support_can_use_everything():
    support = pool(6)
    outside = Example(id="elsewhere", question="?", answers=("x",))
    assert sorted(sample_demonstrations(support, outside, 6, seed=1)) == list(range(6))


def test_independent_of_call_order():
    support = pool(40)
    queries = support[:10] + [Example(id="extra", question="?", answers=("x",))]
    forward = {q.id: sample_demonstrations(support, q, 5, seed=3) for q in queries}
    backward = {q.id: sample_demonstrations(support, q, 5, seed=3) for q in reversed(queries)}
    assert forward == backward


def test_depends_on_seed_and_query():
    support = pool(100)
    by_seed = {tuple(sample_demonstrations(support, support[0], 4, seed=s)) for s in range(20)}
    by_query = {tuple(sample_demonstrations(support, q, 4, seed=0)) for q in support[:20]}
    assert len(by_seed) > 15 and len(by_query) > 15


def test_stable_across_processes():
    """String seeds hash with sha512, not Python's salted hash: another process agrees."""
    code = (
        "import json; from pipeline.tasks.base import Example; "
        "from pipeline.tasks.sampling import sample_demonstrations as s; "
        "p=[Example(f'q{i}', '', ('a',)) for i in range(30)]; print(json.dumps(s(p, p[4], 6, 11)))"
    )
    env_runs = []
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
        )
        env_runs.append(json.loads(out.stdout))
    support = pool(30)
    assert env_runs[0] == env_runs[1] == sample_demonstrations(support, support[4], 6, 11)


def test_too_many_shots_is_a_user_error():
    support = pool(5)
    with pytest.raises(UserError, match="only 4 other"):
        sample_demonstrations(support, support[0], 5, seed=0)
    with pytest.raises(UserError, match="only 5 examples"):
        sample_demonstrations(support, support[0], 6, seed=0)
    with pytest.raises(UserError, match=">= 0"):
        sample_demonstrations(support, support[0], -1, seed=0)
    assert sample_demonstrations(support, support[0], 0, seed=0) == []


def test_unknown_strategy_lists_valid_ones():
    support = pool(5)
    with pytest.raises(UserError, match="random"):
        sample_demonstrations(support, support[0], 2, seed=0, strategy="similarity")
    assert "random" in STRATEGIES


def test_reads_only_the_drawn_rows():
    """A lazy 100k-row support split must not be materialised to sample 8 demonstrations."""
    support = CountingPool(pool(100_000))
    CountingPool.reads = 0
    picked = sample_demonstrations(support, support[10], 8, seed=0)
    assert len(picked) == 8 and CountingPool.reads <= 1 + 9
