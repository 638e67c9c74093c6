"""Scoring rules, pinned on the tricky cases of the official VQAv2 script, GQA and POPE."""

from __future__ import annotations

import pytest

from pipeline.scoring import (
    exact_match,
    normalize_answer,
    process_punctuation,
    score_item,
    vqa_accuracy,
    yes_no,
)


def ten(answer: str) -> list[str]:
    return [answer] * 10


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("yes", "yes"),
        ("Yes.", "yes"),  # case and trailing period
        ("YES", "yes"),
        ("\tyes\n", "yes"),  # tab/newline -> space, stripped
        ("two", "2"),  # number words -> digits
        ("Two.", "2"),
        ("none", "0"),  # the script maps 'none' to 0 as well
        ("ten", "10"),
        ("a dog", "dog"),  # articles dropped
        ("The red ball", "red ball"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions fixed
        ("isnt", "isn't"),
        ("black-and-white", "black and white"),  # punctuation inside a word -> space
        ("yes, it is", "yes it is"),  # punctuation next to a space -> removed
        ("1,000", "1000"),  # digit,digit comma -> removed
        ("3.5", "3.5"),  # a period before a digit stays
        ("(red)", "red"),
        ("what?!", "what"),
        ("left / right", "left right"),  # '/' removed; the word split collapses the double space
    ],
)
def test_normalization_matches_identical_answers(prediction, answer):
    assert vqa_accuracy(prediction, ten(answer)) == 1.0


@pytest.mark.parametrize(
    "prediction, answer",
    [("yes", "no"), ("2", "3"), ("dogs", "dog"), ("red ball", "ball"), ("3 5", "3.5"), ("", "yes")],
)
def test_mismatches_score_zero(prediction, answer):
    assert vqa_accuracy(prediction, ten(answer)) == 0.0


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_soft_accuracy(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_fewer_than_ten_answers():
    # cat_i: 1 other match -> 1/3 (twice); dog: 2 matches -> 2/3; mean 4/9
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("cat", ["cat", "cat", "cat", "cat"]) == 1.0
    assert vqa_accuracy("cat", ["cat"]) == 0.0  # leave-one-out with one answer leaves nothing to match
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_differing_answers_get_punctuation_processing_only():
    # not all identical -> 'red-ball' becomes 'red ball' (4 matches -> 1.0)
    answers = ["red-ball"] * 4 + ["ball"] * 6
    assert vqa_accuracy("red ball", answers) == 1.0
    # ... but no article/digit processing on the answers: 'the dog' never equals the normalized 'dog'
    assert vqa_accuracy("the dog", ["the dog"] * 5 + ["dog"] * 5) == 1.0  # 5 x 'dog' match
    assert vqa_accuracy("dog", ["the dog"] * 9 + ["dog"]) == pytest.approx(0.3)
    # identical raw answers are compared as given (official files hold normalized answers)
    assert vqa_accuracy("yes", ten("Yes")) == 0.0


def test_process_punctuation_rules():
    assert process_punctuation("a-b") == "a b"
    assert process_punctuation("a - b") == "a  b"
    assert process_punctuation("1,5 and x-y") == "15 and xy"  # a digit comma switches every mark to delete
    assert process_punctuation("end.") == "end"
    assert process_punctuation("." * 40) == "." * 8  # the script's count=re.UNICODE (32) quirk
    assert normalize_answer("  The Two Dogs!  ") == "2 dogs"


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [("Yes.", "yes", 1.0), (" Red. ", "red", 1.0), ("red", "Red", 1.0), ("yes", "no", 0.0),
     ("red ball", "ball", 0.0), ("red.", "red..", 1.0)],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("no,", "no"),
        ("There is not a dog in the image", "no"),
        ("Yes. There is no cat.", "yes"),  # first sentence only
        ("Nothing suggests otherwise", "yes"),  # whole words, not substrings
        ("I see no\ncat", "no"),
        ("", "yes"),
    ],
)
def test_yes_no_pope_rule(prediction, expected):
    assert yes_no(prediction) == expected


def test_score_item_dispatch():
    assert score_item("two", ten("2")) == 1.0
    assert score_item("Yes.", ["yes"], metric="exact") == 1.0
    assert score_item("No, not at all", ["no"], metric="yes_no") == 1.0
    assert score_item("x", None) is None and score_item("x", []) is None and score_item(None, ["x"]) is None
    with pytest.raises(ValueError, match="unknown metric"):
        score_item("x", ["x"], metric="bleu")
