"""Evaluation metrics: VQA accuracy, CIDEr-D and exact match, as pure functions (docs/architecture.md §6).

VQA accuracy ports the official GT-Vision-Lab evaluation (``PythonEvaluationTools/vqaEvaluation/
vqaEval.py``, master branch, the version OpenFlamingo and LAVIS copy): its contraction map, number
words, articles, ``periodStrip`` / ``commaStrip`` regexes, punctuation list, ``processPunctuation``
and ``processDigitArticle``, quirks included (see each function). CIDEr-D is ``pycocoevalcap``'s
``PTBTokenizer`` + ``Cider``, exactly what ``COCOEvalCap.evaluate`` runs for CIDEr, minus SPICE.
"""

from __future__ import annotations

import re
import shutil
import string
from collections.abc import Sequence

from pipeline.config import UserError

METRIC_NAMES = ("vqa_accuracy", "cider", "exact_match")

# Official vqaEval.py tables, verbatim. Keys such as "Im" or "Id've" can never match because the
# text is lower-cased first, and "somebody'd" maps to "somebodyd": kept as the official code has them.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Official typo: "(?!<=\d)" is a negative *lookahead* for the text "<=digit", not a lookbehind, so it
# never fires: every "." not followed by a digit is removed ("2.5" stays, "2." and "u.s." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# No apostrophe, colon or period here: "don't" keeps its apostrophe, "10:30" keeps its colon.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
# The official code calls periodStrip.sub("", text, re.UNICODE): the flag lands in the `count`
# argument, so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_EDGE_CHARS = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019\u00ab\u00bb"


class JavaNotFoundError(UserError):
    """Raised when ``java`` is not on PATH: pycocoevalcap's PTB tokenizer runs a Java program."""


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space-out punctuation, then strip periods.

    A mark is deleted when it touches a space anywhere in the *input* text, or when the input holds
    a digit-comma-digit ("1,000" -> "1000", and then every other mark is deleted too); otherwise it
    becomes a space ("red/white" -> "red white"). ``commaStrip`` is only searched, never substituted.
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCT:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits
    ("two" -> "2", "none" -> "0"), drop "a"/"an"/"the", expand contractions ("dont" -> "don't")."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The official answer normalisation: ``processPunctuation`` then ``processDigitArticle``."""
    return _process_digit_article(_process_punctuation(text))


def _clean_whitespace(text: str) -> str:
    """Official first step for predictions and human answers: '\\n' and '\\t' -> ' ', then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _check_answers(answers: Sequence[str], what: str) -> list[str]:
    if isinstance(answers, str):
        raise TypeError(f"{what}: expected a sequence of answer strings, got the string {answers!r}; "
                        f"wrap it in a list.")
    if len(answers) == 0:
        raise ValueError(f"{what}: has no ground-truth answers; every question needs at least one.")
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction, in [0, 1], as the official ``VQAEval.evaluate``.

    ``answers`` are all human answers (10 for VQAv2; OK-VQA stores each of its 5 twice, pass all 10).
    Both sides get '\\n'/'\\t' -> ' ' and strip. Only when the stripped answers hold more than one
    distinct string are answers *and* prediction normalised (``normalize_vqa_answer``); otherwise the
    comparison is raw and case-sensitive ("yes." never matches ten "yes"). The score is the mean over
    the leave-one-out subsets of min(1, matches / 3): 1, 2, 3, 4+ matches among 10 -> 0.3, 0.6, 0.9, 1.

    Raises ValueError for fewer than 2 answers: with one answer every leave-one-out subset is empty
    and the official formula returns 0 whatever the prediction (use ``exact_match`` instead).
    """
    gts = [_clean_whitespace(a) for a in _check_answers(answers, "vqa_accuracy")]
    if len(gts) < 2:
        raise ValueError(f"vqa_accuracy: got 1 answer {gts!r}; its leave-one-out mean is always 0. "
                         f"Pass all human answers (10 for VQAv2 / OK-VQA) or use exact_match.")
    pred = _clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_vqa_answer(a) for a in gts]
        pred = normalize_vqa_answer(pred)
    # Leave one *position* out: the official code drops the held-out answer dict, and answer dicts are
    # distinct by answer_id, so duplicates (OK-VQA) still count for each other.
    per_subset = [min(1.0, sum(a == pred for j, a in enumerate(gts) if j != i) / 3)
                  for i in range(len(gts))]
    return sum(per_subset) / len(per_subset)


def _check_corpus(predictions: Sequence[str], references: Sequence, what: str) -> None:
    if isinstance(predictions, str):
        raise TypeError(f"{what}: predictions must be a sequence of strings, got one string.")
    if len(predictions) != len(references):
        raise ValueError(f"{what}: got {len(predictions)} predictions but {len(references)} answer "
                         f"lists; they must be aligned one to one.")
    if len(predictions) == 0:
        raise ValueError(f"{what}: empty corpus; pass at least one prediction.")


def vqa_accuracy_corpus(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean ``vqa_accuracy`` over questions, as a fraction in [0, 1] (the official tool prints ×100,
    rounded to 2 decimals; no rounding here)."""
    _check_corpus(predictions, answers, "vqa_accuracy_corpus")
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)


def _require_java() -> None:
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "CIDEr needs Java: pycocoevalcap's PTBTokenizer runs the Stanford CoreNLP tokenizer with "
            "`java`, which is not on PATH. Install a JRE (e.g. `apt-get install default-jre-headless`) "
            "or add its bin/ directory to PATH.")


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, coco-caption's variant: n=4, sigma=6, clipped, ×10).

    Captions are PTB-tokenised (lower-cased, punctuation dropped) then scored by ``Cider``, exactly as
    ``COCOEvalCap.evaluate`` does. The IDF comes from the references of the *whole* corpus, so a
    sample's score depends on the others: score the full split at once, never in batches.
    Returns (corpus score, per-sample scores), unscaled (papers report ×100).
    """
    _check_corpus(predictions, references, "cider")
    refs = [_check_answers(r, f"cider: references[{i}]") for i, r in enumerate(references)]
    _require_java()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in caps] for i, caps in enumerate(refs)}
    res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
    tokenizer = PTBTokenizer()
    corpus, per_sample = Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))
    return float(corpus), [float(s) for s in per_sample]


def _normalize_exact(text: str) -> str:
    """Lower-case, collapse internal whitespace, strip surrounding punctuation, quotes and spaces."""
    return " ".join(text.lower().split()).strip(_EDGE_CHARS)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0 (text tasks)."""
    gold = {_normalize_exact(a) for a in _check_answers(answers, "exact_match")}
    return 1.0 if _normalize_exact(prediction) in gold else 0.0


def exact_match_corpus(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean ``exact_match`` over the corpus, as a fraction in [0, 1]."""
    _check_corpus(predictions, answers, "exact_match_corpus")
    return sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)


def score(metric_name: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Score a corpus by metric name, on the scale papers report.

    Returns ``{"metric": name, "score": float, "per_sample": list[float]}``; ``score`` and every
    ``per_sample`` entry are ×100 (accuracy and exact match in percent, CIDEr ×100).
    """
    if metric_name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric_name!r}; valid names: {', '.join(METRIC_NAMES)}.")
    _check_corpus(predictions, answers, metric_name)
    if metric_name == "cider":
        corpus, per_sample = cider(predictions, answers)
    else:
        one = vqa_accuracy if metric_name == "vqa_accuracy" else exact_match
        per_sample = [one(p, a) for p, a in zip(predictions, answers, strict=True)]
        corpus = sum(per_sample) / len(per_sample)
    return {"metric": metric_name, "score": 100.0 * corpus, "per_sample": [100.0 * s for s in per_sample]}
