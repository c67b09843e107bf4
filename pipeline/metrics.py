"""Evaluation metrics: VQA accuracy, CIDEr-D, exact match and the MME / SEED-Bench answer accuracies, as
pure functions (docs/architecture.md §6).

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
from typing import Any

from pipeline.config import UserError

METRIC_NAMES = ("vqa_accuracy", "cider", "exact_match", "mme_accuracy", "seed_accuracy")
"""Per-example metrics a task can name: the kinds' defaults, then the benchmarks' answer accuracies
(``mme_correct``, ``seed_correct``; their per-group scores are ``mme_scores`` / ``seed_accuracy``)."""

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
        one = {"vqa_accuracy": vqa_accuracy, "exact_match": exact_match, "mme_accuracy": mme_correct,
               "seed_accuracy": seed_correct}[metric_name]
        per_sample = [one(p, a) for p, a in zip(predictions, answers, strict=True)]
        corpus = sum(per_sample) / len(per_sample)
    return {"metric": metric_name, "score": 100.0 * corpus, "per_sample": [100.0 * s for s in per_sample]}


# --- Benchmark scorers: MME, SEED-Bench (image), VQAv2 / OK-VQA by answer type ------------------------

# MME (Fu et al. 2023). The rules follow the official eval tool ``eval_tool/calculation.py`` shipped with
# the MME release (read in the verbatim copy zjunlp/Deco eval_tool/calculation.py; a LLaVA-based copy
# has the same rules): its ``eval_type_dict``, ``parse_pred_ans`` and the acc / acc_plus sums.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(prediction: str) -> str:
    """Official ``parse_pred_ans`` on the lower-cased response: "yes" / "no" when the whole response
    is that word, else "yes" if "yes" occurs in its first 4 characters, else "no" if "no" does, else
    "other" (always wrong). Quirks kept: no stripping (" yes" parses, "  yes" is "other"), "no"
    anywhere in the first 4 characters counts ("not sure" and "none" are "no"), "yes" wins over "no"."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"


def _mme_group(records: Sequence[dict]) -> dict[str, dict[str, list[bool]]]:
    """subtask -> image -> per-question correctness, validating names, answers and pairs."""
    valid = MME_PERCEPTION + MME_COGNITION
    groups: dict[str, dict[str, list[bool]]] = {}
    for i, rec in enumerate(records):
        subtask, answer = rec["subtask"], str(rec["answer"]).lower()
        if subtask not in valid:
            raise ValueError(f"mme_scores: record {i} has unknown subtask {subtask!r}; official names: "
                             f"{', '.join(valid)}.")
        if answer not in ("yes", "no"):  # the official tool asserts gt in ["yes", "no"]
            raise ValueError(f"mme_scores: record {i} has answer {rec['answer']!r}; expected Yes or No.")
        groups.setdefault(subtask, {}).setdefault(str(rec["image"]), []).append(
            mme_parse(rec["prediction"]) == answer)
    for subtask, images in groups.items():
        for image, marks in images.items():
            if len(marks) != 2:  # the official tool asserts len(img_items) == 2
                raise ValueError(f"mme_scores: {subtask} image {image!r} has {len(marks)} questions; MME "
                                 f"asks exactly 2 per image (acc+ needs both).")
    return groups


def mme_scores(records: Sequence[dict]) -> dict:
    """MME scores from records ``{subtask, image, prediction, answer}`` (two questions per image).

    Per subtask (official names, ``MME_PERCEPTION`` / ``MME_COGNITION``): ``acc`` = % questions right,
    ``acc_plus`` = % images with both questions right, ``score`` = acc + acc_plus (0-200), ``n`` =
    questions. "perception" / "cognition" sum the scores of the subtasks present (a missing one adds
    0, as LLaVA's copy of the tool skips a missing result file), "total" is their sum.
    """
    if len(records) == 0:
        raise ValueError("mme_scores: no records.")
    out: dict = {}
    for subtask, images in _mme_group(records).items():
        marks = [m for pair in images.values() for m in pair]
        acc = 100.0 * sum(marks) / len(marks)
        acc_plus = 100.0 * sum(all(pair) for pair in images.values()) / len(images)
        out[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(marks)}
    out["perception"] = sum(out[s]["score"] for s in MME_PERCEPTION if s in out)
    out["cognition"] = sum(out[s]["score"] for s in MME_COGNITION if s in out)
    out["total"] = out["perception"] + out["cognition"]
    return out


def _single_answer(answers: Sequence[str], what: str, valid: tuple[str, ...]) -> str:
    gold = _check_answers(answers, what)
    if len(gold) != 1 or str(gold[0]).strip().lower() not in valid:
        raise ValueError(f"{what}: expected one answer among {', '.join(valid)}, got {gold!r}.")
    return str(gold[0]).strip().lower()


def mme_correct(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction, parsed by the official rule (``mme_parse``), is the MME answer (Yes / No)."""
    return 1.0 if mme_parse(prediction) == _single_answer(answers, "mme_accuracy", ("yes", "no")) else 0.0


# SEED-Bench (Li et al. 2023), image part, options A-D. The official SEED-Bench eval.py ranks options by
# likelihood and parses no text; lmms-eval (tasks/seedbench/utils.py, seed_process_result) keeps only the
# first character of the stripped generation, so "(B)" and "The answer is B" score wrong. seed_letter
# instead uses VLMEvalKit's option matching (vlmeval/utils/matching_util.py, can_infer_option): the
# characters .()[],:;!*#{} become spaces, the text is split on whitespace and a standalone capital
# letter counts; exactly one distinct letter -> that letter. Two rules run first: a letter opening the
# response ("B", "(B)", "B. a cat") and a letter right after "answer/option/choice (is)(:)".
# The article "A": VLMEvalKit only warns about it (and an older copy rejects any response with a token
# "A" among more than 3 tokens, losing "The answer is A"); lmms-eval reads "A cat ..." as option A. Here
# a capital "A" that opens the response or a sentence and is followed by a space and a lower-case
# letter ("A cat is ...", "B. A cat") is an article, not an option; "A", "A.", "(A) cat", "A: cat" and
# "The answer is A" stay option A. Letters are case-sensitive (a lone "b" is not B), as in both tools.
_SEED_OPTIONS = ("A", "B", "C", "D")
_SEED_ARTICLE_A = re.compile(r"(^|[.!?]\s+)A(?=\s+[a-z])")
_SEED_LEADING = re.compile(r"^\s*[(\[]?([A-D])(?=[)\].:,;!]|\s|$)")
_SEED_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*[(\[]?([A-D])(?![A-Za-z0-9])")
_SEED_SPLIT_CHARS = ".()[],:;!*#{}"


def seed_letter(text: str) -> str | None:
    """The option letter (A-D) a generation answers, or None when there is none or it is ambiguous."""
    text = _SEED_ARTICLE_A.sub(r"\1", text)
    for pattern in (_SEED_LEADING, _SEED_PHRASE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    for mark in _SEED_SPLIT_CHARS:
        text = text.replace(mark, " ")
    found = {tok for tok in text.split() if tok in _SEED_OPTIONS}
    return found.pop() if len(found) == 1 else None


def seed_correct(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the option letter ``seed_letter`` reads in the prediction is the answer letter (A-D)."""
    gold = _single_answer(answers, "seed_accuracy", ("a", "b", "c", "d")).upper()
    return 1.0 if seed_letter(prediction) == gold else 0.0


def seed_accuracy(records: Sequence[dict]) -> dict:
    """SEED-Bench accuracy from records ``{question_type, prediction, answer}``, in %.

    Returns ``{"overall": %, "per_type": {question_type: %}, "n": questions}``; "overall" pools all
    questions (LLaVA's convert_seed_for_submission.py: total correct / total count), ``per_type`` keeps
    the types as given (str or int) in first-seen order. An unparsable prediction counts as wrong.
    """
    if len(records) == 0:
        raise ValueError("seed_accuracy: no records.")
    per_type: dict = {}
    for i, rec in enumerate(records):
        answer = str(rec["answer"]).strip()
        if answer not in _SEED_OPTIONS:
            raise ValueError(f"seed_accuracy: record {i} has answer {rec['answer']!r}; "
                             f"expected A, B, C or D.")
        per_type.setdefault(rec["question_type"], []).append(seed_letter(rec["prediction"]) == answer)
    total = sum(len(marks) for marks in per_type.values())
    correct = sum(sum(marks) for marks in per_type.values())
    return {"overall": 100.0 * correct / total,
            "per_type": {t: 100.0 * sum(m) / len(m) for t, m in per_type.items()}, "n": total}


VQA_ANSWER_TYPES = ("yes/no", "number", "other")


def vqa_accuracy_by_type(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                         answer_types: Sequence[str]) -> dict[str, float]:
    """VQA accuracy overall and per answer type, in % (unrounded), as the official ``vqaEval.py``.

    Each question scores ``vqa_accuracy``; "overall" is the mean over all questions and each type the
    mean over its questions (``setAccuracy``: 100 * sum / len; the tool then rounds to 2 decimals).
    Types without questions are left out. Keys: "overall", then "yes/no", "number", "other" when
    present, then any other type string in first-seen order (the official code keeps any type).
    """
    _check_corpus(predictions, answers, "vqa_accuracy_by_type")
    if isinstance(answer_types, str) or len(answer_types) != len(predictions):
        raise ValueError(f"vqa_accuracy_by_type: need one answer type per question ({len(predictions)}), "
                         f"got {len(answer_types) if not isinstance(answer_types, str) else 'a string'}.")
    per_type: dict[str, list[float]] = {}
    scores = []
    for pred, gts, kind in zip(predictions, answers, answer_types, strict=True):
        scores.append(vqa_accuracy(pred, gts))
        per_type.setdefault(kind, []).append(scores[-1])
    out = {"overall": 100.0 * sum(scores) / len(scores)}
    order = [t for t in VQA_ANSWER_TYPES if t in per_type]
    order += [t for t in per_type if t not in VQA_ANSWER_TYPES]
    out.update({t: 100.0 * sum(per_type[t]) / len(per_type[t]) for t in order})
    return out


def chair_scores(chair: Any, records: list[dict]) -> dict:
    """CHAIR of generated captions: ``chair`` (a ``pipeline.chair.Chair``) over ``{record id: prediction}``
    (ids are COCO image ids). Each record gets ``chair`` = its mentioned and hallucinated objects; returns
    CHAIRs, CHAIRi, recall (%) and the counts behind them, without the per-caption detail."""
    result = dict(chair.compute({r["id"]: r["prediction"] for r in records}))
    per_caption = result.pop("per_caption")
    if len(per_caption) != len(records):
        raise ValueError(f"chair_scores: {len(records)} records but {len(per_caption)} distinct image ids; CHAIR "
                         "scores one caption per image.")
    for record, row in zip(records, per_caption.values(), strict=True):  # compute keeps the records' order
        record["chair"] = {"mentioned": row["mentioned"], "hallucinated": row["hallucinated"]}
    return result
