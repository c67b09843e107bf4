"""Metrics against hand-derived values from the official VQA rules and against direct pycocoevalcap.

Leave-one-out by hand, k matches among 10 answers: the k held-out matches see k-1 others, the 10-k
others see k, so acc = [k*min(1,(k-1)/3) + (10-k)*min(1,k/3)] / 10:
k=1 -> 9*(1/3)/10 = 0.3; k=2 -> (2/3 + 16/3)/10 = 0.6; k=3 -> (2 + 7)/10 = 0.9; k=4 -> 10/10 = 1.
"""

from __future__ import annotations

import shutil

import pytest

from pipeline import metrics
from pipeline.metrics import (
    JavaNotFoundError,
    cider,
    exact_match,
    exact_match_corpus,
    normalize_vqa_answer,
    score,
    vqa_accuracy,
    vqa_accuracy_corpus,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),  # number words -> digits
        ("None", "0"),  # lower-cased first, "none" -> "0"
        ("Two dogs", "2 dogs"),
        ("a dog", "dog"),  # articles dropped
        ("The an cat", "cat"),
        ("dont", "don't"),  # contractions restored
        ("Dont", "don't"),
        ("Im", "im"),  # the official key "Im" can never match after lower()
        ("don't", "don't"),  # apostrophe is not in the punctuation list
        ("yes, it is", "yes it is"),  # ", " touches a space -> deleted
        ("yes,no", "yes no"),  # no space, no digit-comma-digit -> becomes a space
        ("red/white", "red white"),
        ("red / white", "red white"),  # deleted, then split() collapses the spaces
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),  # digit-comma-digit -> every mark deleted
        ("1,000 (approx)", "1000 approx"),
        ("hello!", "hello"),  # "!" -> space, stripped by split()
        ("well, the dog!", "well dog"),
        ("10:30", "10:30"),  # colon is not in the list
        ("2.5", "2.5"),  # period followed by a digit is kept
        ("2.", "2"),  # trailing period stripped
        ("yes.", "yes"),
        ("u.s.a.", "usa"),
        (".5", ".5"),  # the intended lookbehind is a no-op lookahead: only the next char matters
        ("  Two   Apples ", "2 apples"),
    ],
)
def test_normalize_vqa_answer_official_rules(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_period_strip_stops_after_32_periods() -> None:
    # Official periodStrip.sub("", text, re.UNICODE) passes 32 as `count`: 40 - 32 = 8 periods stay.
    assert normalize_vqa_answer("." * 40) == "." * 8


def _answers(match: str, k: int) -> list[str]:
    """Ten answers: k copies of `match`, the rest distinct non-matching strings (so set size > 1)."""
    return [match] * k + [f"other{i}" for i in range(10 - k)]


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_vqa_accuracy_steps(k: int, expected: float) -> None:
    assert vqa_accuracy("cat", _answers("cat", k)) == pytest.approx(expected, abs=1e-12)


def test_okvqa_doubled_answers() -> None:
    answers = [a for a in ("cat", "dog", "fish", "bird", "cow") for _ in range(2)]
    assert vqa_accuracy("dog", answers) == pytest.approx(0.6)  # 1 answer x 2 copies = 2 matches
    assert vqa_accuracy("horse", answers) == 0.0


def test_identical_answers_are_compared_raw() -> None:
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0  # no period stripping when all agree
    assert vqa_accuracy("yes.", ["yes."] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # and no lower-casing
    assert vqa_accuracy("the cat", ["cat"] * 10) == 0.0  # nor article removal
    assert vqa_accuracy("yes", [" yes "] * 9 + ["yes\t"]) == 1.0  # whitespace is stripped first
    assert vqa_accuracy("\tyes\n", ["yes"] * 10) == 1.0


def test_differing_answers_normalise_both_sides() -> None:
    assert vqa_accuracy("YES.", ["Yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("the cat", ["cat"] * 9 + ["dog"]) == 1.0
    assert vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0
    # "1,000" -> "1000" in two answers, plus one literal "1000": 3 matches -> 0.9.
    assert vqa_accuracy("1000", ["1,000"] * 2 + ["1000"] + ["many"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_errors() -> None:
    with pytest.raises(ValueError, match="no ground-truth answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="always 0"):
        vqa_accuracy("yes", ["yes"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        vqa_accuracy("yes", "yes")


def test_vqa_accuracy_corpus_is_a_fraction() -> None:
    preds = ["cat", "cat"]
    answers = [_answers("cat", 4), _answers("cat", 1)]
    assert vqa_accuracy_corpus(preds, answers) == pytest.approx((1.0 + 0.3) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_accuracy_corpus(preds, answers[:1])
    with pytest.raises(ValueError, match="empty corpus"):
        vqa_accuracy_corpus([], [])
    with pytest.raises(ValueError, match="no ground-truth answers"):
        vqa_accuracy_corpus(["cat"], [[]])


def test_exact_match() -> None:
    assert exact_match('"Paris."', ["paris"]) == 1.0
    assert exact_match("  New \n  York ", ["new york"]) == 1.0
    assert exact_match("\u201cRome\u201d", ["Paris", "ROME!"]) == 1.0
    assert exact_match("Paris, France", ["paris"]) == 0.0
    assert exact_match("U.S.", ["us"]) == 0.0  # internal punctuation is kept: "u.s" != "us"
    assert exact_match_corpus(["a", "b", "c", "d"], [["a"], ["x"], ["c"], ["y"]]) == 0.5
    with pytest.raises(ValueError, match="no ground-truth answers"):
        exact_match("a", [])
    with pytest.raises(ValueError, match="empty corpus"):
        exact_match_corpus([], [])


def test_score_dispatch_scales_to_100() -> None:
    result = score("vqa_accuracy", ["cat", "cat"], [_answers("cat", 4), _answers("cat", 1)])
    assert result["metric"] == "vqa_accuracy"
    assert result["score"] == pytest.approx(65.0)
    assert result["per_sample"] == pytest.approx([100.0, 30.0])
    result = score("exact_match", ["a", "b"], [["A"], ["c"]])
    assert result == {"metric": "exact_match", "score": 50.0, "per_sample": [100.0, 0.0]}
    with pytest.raises(ValueError, match="vqa_accuracy, cider, exact_match"):
        score("bleu", ["a"], [["a"]])


CAPTION_REFS = [
    ["A dog runs on the grass.", "a brown dog running in a field", "Dog playing outside."],
    ["Two cats sleep on a sofa.", "a pair of cats napping on the couch"],
    ["A man rides a bicycle down the street.", "a person cycling on a road",
     "man on a bike in the city", "A cyclist in traffic.", "someone riding a bike"],
    ["A plate of pasta with tomato sauce.", "spaghetti on a white plate", "a bowl of noodles"],
    ["Children play football in a park.", "kids kicking a ball on grass", "a soccer game in a park",
     "young boys playing soccer"],
]
CAPTION_PREDS = ["a dog running in the grass", "two cats sleeping on a couch", "a man riding a bike",
                 "a plate of spaghetti", "kids playing soccer in a park"]


def _reference_cider(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """Independent reference: COCO-style dicts straight into PTBTokenizer + Cider."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {f"img{i}": [{"caption": c} for c in caps] for i, caps in enumerate(refs)}
    res = {f"img{i}": [{"caption": p}] for i, p in enumerate(preds)}
    tok = PTBTokenizer()
    corpus, per = Cider().compute_score(tok.tokenize(gts), tok.tokenize(res))
    return float(corpus), [float(s) for s in per]


@needs_java
def test_cider_matches_pycocoevalcap() -> None:
    corpus, per_sample = cider(CAPTION_PREDS, CAPTION_REFS)
    ref_corpus, ref_per = _reference_cider(CAPTION_PREDS, CAPTION_REFS)
    assert corpus == pytest.approx(ref_corpus, rel=1e-12)
    assert per_sample == pytest.approx(ref_per, rel=1e-12)
    assert corpus == pytest.approx(sum(per_sample) / len(per_sample))
    assert corpus > 0
    result = score("cider", CAPTION_PREDS, CAPTION_REFS)
    assert result["score"] == pytest.approx(100 * corpus)
    assert result["per_sample"] == pytest.approx([100 * s for s in per_sample])


@needs_java
def test_cider_perfect_beats_wrong_and_depends_on_corpus() -> None:
    perfect = [CAPTION_REFS[0][1], *CAPTION_PREDS[1:]]
    wrong = ["airplanes parked at an airport", *CAPTION_PREDS[1:]]
    _, per_perfect = cider(perfect, CAPTION_REFS)
    _, per_wrong = cider(wrong, CAPTION_REFS)
    assert per_perfect[0] > per_wrong[0]
    assert per_wrong[0] == 0.0  # no n-gram in common with any reference
    # IDF over a one-image corpus is log(1/1) = 0 for every n-gram, so alone it scores 0.
    alone, _ = cider(perfect[:1], CAPTION_REFS[:1])
    assert alone == 0.0 and per_perfect[0] > 0


def test_cider_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        cider([], [])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        cider(["a dog"], [["a dog"], ["a cat"]])
    monkeypatch.setattr(metrics.shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(JavaNotFoundError, match="apt-get install default-jre-headless") as info:
        cider(["a dog"], [["a dog"]])
    assert isinstance(info.value, RuntimeError)
    assert "PTBTokenizer" in str(info.value) and "Java" in str(info.value)
