"""MME, SEED-Bench and VQA-by-answer-type scorers against hand-derived values.

Every expected number is worked out by hand in a comment next to it, from the rules of the official
tools cited in pipeline/metrics.py (MME eval_tool/calculation.py, VLMEvalKit can_infer_option,
vqaEval.py), never by calling the code under test.
"""

from __future__ import annotations

import pytest

from pipeline.metrics import mme_parse, mme_scores, seed_accuracy, seed_letter, vqa_accuracy_by_type

# --- MME -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "parsed"),
    [
        ("Yes", "yes"),  # whole response, lower-cased
        ("no", "no"),
        ("No, there is not.", "no"),  # first 4 chars "no, " hold "no"
        ("Yes, there is a dog.", "yes"),
        (" yes", "yes"),  # not stripped: " yes" still holds "yes" in its first 4 chars
        ("  yes", "other"),  # "  ye": no "yes", no "no"
        ("not sure", "no"),  # official quirk: "not " holds "no"
        ("None", "no"),  # "none" holds "no"
        ("I think yes", "other"),  # the answer must open the response
        ("", "other"),
    ],
)
def test_mme_parse_follows_the_official_prefix_rule(prediction, parsed):
    assert mme_parse(prediction) == parsed


def _mme(subtask, image, prediction, answer):
    return {"subtask": subtask, "image": image, "prediction": prediction, "answer": answer}


def test_mme_scores_by_hand():
    records = [
        # existence: e1 both right, e2 second wrong
        _mme("existence", "e1.jpg", "Yes", "Yes"),
        _mme("existence", "e1.jpg", "No, there is not.", "No"),
        _mme("existence", "e2.jpg", "yes", "Yes"),
        _mme("existence", "e2.jpg", "Yes", "No"),
        # count: c1 both wrong ("ther" -> other; "   n" -> other), c2 both right
        _mme("count", "c1.jpg", "There are two.", "Yes"),
        _mme("count", "c1.jpg", "   no", "No"),
        _mme("count", "c2.jpg", " yes", "Yes"),
        _mme("count", "c2.jpg", "None", "No"),
        # code_reasoning: one image, both right; the same image name in another subtask is another image
        _mme("code_reasoning", "e1.jpg", "YES.", "Yes"),
        _mme("code_reasoning", "e1.jpg", "no", "No"),
    ]
    out = mme_scores(records)
    # existence: acc = 3/4 = 75, acc+ = 1/2 images = 50, score = 125
    assert out["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4}
    # count: acc = 2/4 = 50, acc+ = 1/2 = 50, score = 100
    assert out["count"] == {"acc": 50.0, "acc_plus": 50.0, "score": 100.0, "n": 4}
    # code_reasoning: acc = 2/2 = 100, acc+ = 1/1 = 100, score = 200
    assert out["code_reasoning"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "n": 2}
    assert out["perception"] == 225.0  # 125 + 100 (other perception subtasks absent)
    assert out["cognition"] == 200.0
    assert out["total"] == 425.0  # 225 + 200


def test_mme_answer_case_is_ignored():
    # gt "yes" / "YES" are lower-cased like the official tool: 2/2 right, 1/1 image -> 100 + 100
    out = mme_scores([_mme("OCR", "o.jpg", "Yes", "yes"), _mme("OCR", "o.jpg", "No", "NO")])
    assert out["OCR"]["score"] == 200.0
    assert out["perception"] == 200.0 and out["cognition"] == 0.0


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([_mme("ocr", "o.jpg", "Yes", "Yes"), _mme("ocr", "o.jpg", "No", "No")], "unknown subtask 'ocr'"),
        ([_mme("OCR", "o.jpg", "Yes", "Maybe"), _mme("OCR", "o.jpg", "No", "No")], "expected Yes or No"),
        ([_mme("OCR", "o.jpg", "Yes", "Yes")], "exactly 2 per image"),
        ([], "no records"),
    ],
)
def test_mme_rejects_bad_records(records, message):
    with pytest.raises(ValueError, match=message):
        mme_scores(records)


# --- SEED-Bench ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. a cat", "B"),
        ("  C\n", "C"),
        ("The answer is B", "B"),
        ("Answer: (C) dog", "C"),
        ("The correct option is D.", "D"),
        ("I think it is C, the dog.", "C"),  # one standalone letter (VLMEvalKit rule)
        ("The answer is A because the cat sleeps", "A"),  # "A" after "answer is" is an option
        ("A", "A"),
        ("A.", "A"),
        ("(A) cat", "A"),
        ("A: cat", "A"),
        ("B. A cat is sitting.", "B"),  # the sentence-initial article "A" is not a second option
        ("a cat", None),  # lower-case "a" is never an option
        ("", None),
        ("Because", None),  # capital B inside a word
        ("A cat is sitting on the mat.", None),  # article "A" (documented choice)
        ("It is B or C", None),  # two distinct letters: ambiguous
        ("b", None),  # case-sensitive, as lmms-eval and VLMEvalKit
    ],
)
def test_seed_letter(text, letter):
    assert seed_letter(text) == letter


def test_seed_accuracy_by_hand():
    records = [
        {"question_type": "Scene Understanding", "prediction": "B", "answer": "B"},  # right
        {"question_type": "Scene Understanding", "prediction": "(C)", "answer": "C"},  # right
        {"question_type": "Scene Understanding", "prediction": "A cat", "answer": "A"},  # None: wrong
        {"question_type": "Scene Understanding", "prediction": "The answer is D", "answer": "D"},  # right
        {"question_type": 2, "prediction": "Answer: (A) dog", "answer": "A"},  # right
        {"question_type": 2, "prediction": "", "answer": "B"},  # wrong
        {"question_type": 3, "prediction": "C.", "answer": "B"},  # wrong
    ]
    out = seed_accuracy(records)
    assert out["n"] == 7
    # 4 right of 7 -> 100 * 4 / 7 = 57.142857...
    assert out["overall"] == pytest.approx(57.142857142857, abs=1e-9)
    # Scene Understanding 3/4 = 75; type 2: 1/2 = 50; type 3: 0/1 = 0
    assert out["per_type"] == {"Scene Understanding": 75.0, 2: 50.0, 3: 0.0}
    assert list(out["per_type"]) == ["Scene Understanding", 2, 3]  # first-seen order


def test_seed_accuracy_rejects_a_bad_answer():
    with pytest.raises(ValueError, match="expected A, B, C or D"):
        seed_accuracy([{"question_type": 1, "prediction": "A", "answer": "E"}])
    with pytest.raises(ValueError, match="no records"):
        seed_accuracy([])


# --- VQA accuracy by answer type ------------------------------------------------------------------------


def test_vqa_accuracy_by_type_by_hand():
    # Per question (leave-one-out over 10 answers, k matches: k=1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1):
    predictions = ["yes", "no", "2", "two", "red"]
    answers = [
        ["yes"] * 10,  # 10 matches -> 1.0
        ["yes"] * 10,  # 0 matches -> 0.0
        ["2"] * 3 + ["3"] * 7,  # k=3 -> 0.9
        ["2"] * 1 + ["3"] * 9,  # "two" normalises to "2" (answers differ, so both normalised): k=1 -> 0.3
        ["red"] * 2 + ["blue"] * 8,  # k=2 -> 0.6
    ]
    types = ["yes/no", "yes/no", "number", "number", "other"]
    out = vqa_accuracy_by_type(predictions, answers, types)
    assert list(out) == ["overall", "yes/no", "number", "other"]
    assert out["overall"] == pytest.approx(56.0)  # (1 + 0 + 0.9 + 0.3 + 0.6) / 5 = 2.8 / 5 = 0.56
    assert out["yes/no"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert out["number"] == pytest.approx(60.0)  # (0.9 + 0.3) / 2
    assert out["other"] == pytest.approx(60.0)  # 0.6 / 1


def test_vqa_accuracy_by_type_leaves_out_absent_types():
    # OK-VQA style: every question "other"; k=4 -> 1.0 and k=0 -> 0.0, mean 50
    out = vqa_accuracy_by_type(["cat", "dog"], [["cat"] * 4 + ["x"] * 6, ["cat"] * 10], ["other", "other"])
    assert out == pytest.approx({"overall": 50.0, "other": 50.0})


def test_vqa_accuracy_by_type_checks_alignment():
    with pytest.raises(ValueError, match="one answer type per question"):
        vqa_accuracy_by_type(["yes"], [["yes"] * 10], ["yes/no", "other"])
    with pytest.raises(ValueError, match="aligned one to one"):
        vqa_accuracy_by_type(["yes", "no"], [["yes"] * 10], ["yes/no", "yes/no"])
