"""Demonstration sampling for k-shot ICL (teacher cache and ICL evaluation use the same sampler).

The official MimIC code drew demonstrations with replacement and could pick the query itself as
one of its own demonstrations; here they are drawn without replacement, the query is excluded by
id, and the draw depends only on (seed, query id, k, len(support)): the same query gets the same
demonstrations in any process, in any order of calls.

``similar`` (RICES, as LIVE's code) takes the k support examples nearest to the query by cosine similarity
of the model's own embeddings, the most similar last; the embeddings and the search are
``pipeline.retrieval``'s (this module imports no model code: the caller passes the index).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import UserError
from pipeline.tasks.base import Example


def _random_strategy(support: Sequence[Example], query: Example, k: int, seed: int) -> list[int]:
    n = len(support)
    rng = random.Random(f"{seed}:{query.id}")  # str seeds hash with sha512: stable across runs
    # draw one spare so that dropping the query (if drawn) still leaves k; only drawn rows are read
    drawn = rng.sample(range(n), min(k + 1, n))
    kept = [i for i in drawn if support[i].id != query.id]
    if len(kept) < k:
        raise UserError(
            f"cannot sample {k} demonstrations for query {query.id}: the support split has only "
            f"{len(kept)} other examples; lower the number of shots or enlarge the support split"
        )
    return kept[:k]


STRATEGIES: dict[str, Callable[[Sequence[Example], Example, int, int], list[int]]] = {
    "random": _random_strategy,
}
"""Demonstration strategies by name: ``fn(support, query, k, seed) -> indices into support``."""
DEMO_CHOICES = (*STRATEGIES, "similar")
"""``--demos``: the seeded strategies plus ``similar``, which needs a ``pipeline.retrieval.DemoIndex``."""


def sample_demonstrations(
    support: Sequence[Example], query: Example, k: int, seed: int, strategy: str = "random", index: Any = None
) -> list[int]:
    """Indices of ``k`` distinct demonstrations in ``support`` for ``query`` (never the query itself).

    Deterministic in (strategy, seed, query.id, k, len(support)), independent of call order; ``similar``
    asks ``index`` (a ``pipeline.retrieval.DemoIndex`` of this support split) and ignores the seed.
    ``k`` larger than the examples available (the query excluded) raises ``UserError``.
    """
    if strategy not in DEMO_CHOICES:
        raise UserError(
            f"unknown demonstration strategy '{strategy}'; valid: {', '.join(sorted(DEMO_CHOICES))}"
        )
    if k < 0:
        raise UserError(f"the number of shots must be >= 0, got {k}")
    if k == 0:
        return []
    if k > len(support):
        raise UserError(
            f"cannot sample {k} demonstrations: the support split has only {len(support)} examples; "
            f"lower the number of shots or enlarge the support split"
        )
    if strategy == "similar":
        if index is None:
            raise ValueError("the similar strategy needs the support split's index (pipeline.retrieval)")
        return index.nearest(query, k)
    return STRATEGIES[strategy](support, query, k, seed)
