"""Task modules mmbench, seed, scienceqa, mmvp, flickr30k: rows, ground truth, scores and aggregates on small
hand-built inputs whose right numbers were worked out by hand (see the comments by each expectation)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from pipeline.tasks import flickr30k, get, mmbench, mmvp, scienceqa, seed
from pipeline.tasks.common import OPTION_ANSWER, Reader

SUFFIX = "\n" + OPTION_ANSWER


@pytest.mark.parametrize("name", ["mmbench", "seed", "scienceqa", "mmvp", "flickr30k"])
def test_modules_define_the_interface(name):
    task = get(name)
    assert task.NAME == name and task.FORMATS and isinstance(task.MAX_NEW_TOKENS, int)
    assert {"id", "question", "answers", "question_type", "score", "error"}.isdisjoint(task.EXTRA_FIELDS.names)
    for fn in ("load_truth", "to_row", "score", "aggregate"):
        assert callable(getattr(task, fn))


def test_max_new_tokens_follow_the_scripts():
    assert (mmbench.MAX_NEW_TOKENS, seed.MAX_NEW_TOKENS, scienceqa.MAX_NEW_TOKENS) == (1024, 128, 1024)
    assert (mmvp.MAX_NEW_TOKENS, flickr30k.MAX_NEW_TOKENS) == (512, 128)


# ---------------------------------------------------------------------------------------------- mmbench

TSV = {"index": "12", "question": "What is shown?", "hint": "Look closely.", "A": "cat", "B": "dog", "C": "nan",
       "D": "", "answer": "B", "category": "object", "l2-category": "perception", "image": "aGVsbG8="}  # fmt: skip


def test_mmbench_tsv_row_layout():
    row = mmbench.to_row(dict(TSV), "mmbench-tsv", None, 0)
    assert row["question"] == "Look closely.\nWhat is shown?\nA. cat\nB. dog" + SUFFIX  # hint, question, A/B only
    assert row["answers"] == ["B", "cat", "dog"]
    assert (row["id"], row["index"], row["image_b64"]) == ("12", 12, "aGVsbG8=")
    assert (row["A"], row["B"], row["C"], row["D"]) == ("cat", "dog", None, None)
    assert (row["question_type"], row["category"], row["l2_category"]) == ("object", "object", "perception")
    assert "input_error" not in row and "image" not in row


def test_mmbench_no_hint_and_options_stop_at_first_missing():
    rec = dict(TSV, hint="nan", C="", D="bird")  # LLaVA's get_options stops at C: D is never shown
    row = mmbench.to_row(rec, "mmbench-tsv", None, 0)
    assert row["question"] == "What is shown?\nA. cat\nB. dog" + SUFFIX
    assert row["question"].split("\n")[0] == "What is shown?"


def test_mmbench_unknown_answer_letter_is_an_input_error():
    row = mmbench.to_row(dict(TSV, answer="C"), "mmbench-tsv", None, 0)  # C is 'nan': not an option
    assert "unknown option letter 'C'" in row["input_error"]


def test_mmbench_hf_parquet_image_dict():
    rec = dict(TSV, index=7, hint=None, image={"bytes": b"\x89PNG", "path": "x.png"}, C=None, D=None)
    rec["L2-category"] = rec.pop("l2-category")
    row = mmbench.to_row(rec, "hf-parquet", None, 0)
    assert row["image"] == b"\x89PNG" and "image_b64" not in row and row["index"] == 7
    assert row["l2_category"] == "perception" and row["question"].startswith("What is shown?\nA. cat")


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", 1.0),
        ("B.", 1.0),  # wrapped letter
        ("(B)", 1.0),
        ("The answer is B.", 1.0),  # 'B.' is the one wrapped letter
        ("A", 0.0),
        ("A dog", 0.0),  # a lone 'A' in <= 3 words is taken as the letter
        ("Maybe A dog here", 1.0),  # > 3 words: 'A' is an article; option text 'dog' -> B
        ("It is a dog", 1.0),  # no letter: the one option text found
        ("cat or dog", 0.0),  # two option texts: nothing inferred
        ("E", 0.0),
        ("", 0.0),
        ("A B", 0.0),  # two bare letters: nothing inferred
    ],
)
def test_mmbench_extraction(prediction, expected):
    assert mmbench.score(prediction, ["B", "cat", "dog"]) == expected


def test_mmbench_aggregate():
    rows = [
        {"score": 1.0, "category": "c1", "l2_category": "L", "index": 1},
        {"score": 0.0, "category": "c1", "l2_category": "L", "index": 1_000_001},
        {"score": 1.0, "category": "c2", "l2_category": "M", "index": 2},
    ]
    out = mmbench.aggregate(rows)
    assert out["accuracy"] == pytest.approx(200 / 3) and out["n"] == 3  # 2 of 3
    assert out["accuracy_by_category"] == {"c1": 50.0, "c2": 100.0}
    assert out["accuracy_by_l2_category"] == {"L": 50.0, "M": 100.0}
    assert out["circular_copies"] == 1


# ------------------------------------------------------------------------------------------------- seed

SEED_JSON = {
    "questions": [
        {"question_id": "101", "answer": "A", "question_type_id": 5, "data_type": "image"},
        {"question_id": "102", "answer": "C", "question_type_id": 1, "data_type": "video"},
        {"question_id": "103", "answer": "E", "question_type_id": 5, "data_type": "image"},
    ],
    "question_type": {"Scene Understanding": 1, "Instances Counting": 5},
}
SEED_TEXT = "How many?\nA. One\nB. Two\nC. Three\nD. Four" + SUFFIX


@pytest.fixture
def seed_truth(tmp_path):
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(SEED_JSON))
    return seed.load_truth(str(path), Reader())


def test_seed_load_truth(seed_truth):
    assert seed_truth["questions"]["101"] == {"answer": "A", "data_type": "image", "question_type_id": 5}
    assert seed_truth["types"] == {1: "Scene Understanding", 5: "Instances Counting"}


def test_seed_llava_jsonl_rows(seed_truth):
    rec = {"question_id": 101, "image": "SEED-Bench-image/1.jpg", "text": SEED_TEXT, "category": "x"}
    row = seed.to_row(rec, "llava-jsonl", seed_truth, 0)
    assert row["id"] == "101" and row["question"] == SEED_TEXT  # the file's suffix is not doubled
    assert row["answers"] == ["A", "One", "Two", "Three", "Four"]
    assert (row["question_type"], row["question_type_id"], row["data_type"]) == ("Instances Counting", 5, "image")
    assert row["image_file"] == "SEED-Bench-image/1.jpg" and "input_error" not in row
    video = seed.to_row(dict(rec, question_id="102"), "llava-jsonl", seed_truth, 1)
    assert video["answers"] is None and video["question_type"] == "Scene Understanding"  # video: unscored
    bad = seed.to_row(dict(rec, question_id="103"), "llava-jsonl", seed_truth, 2)
    assert "unknown option letter 'E'" in bad["input_error"]
    with pytest.raises(ValueError, match="SEED-Bench.json"):
        seed.to_row(rec, "llava-jsonl", None, 0)


def test_seed_hf_parquet_row():
    rec = {"question_id": "7", "question": "How many?", "choice_a": "One", "choice_b": "Two", "choice_c": "Three",
           "choice_d": "Four", "answer": "B", "data_type": "image", "question_type_id": 5,
           "image": [{"bytes": b"img", "path": None}]}  # fmt: skip
    row = seed.to_row(rec, "hf-parquet", None, 0)
    assert row["question"] == SEED_TEXT and row["answers"] == ["B", "One", "Two", "Three", "Four"]
    assert row["image"] == b"img" and row["question_type"] == "5"


@pytest.mark.parametrize("prediction, expected", [("A", 1.0), (" A\n", 1.0), ("A.", 0.0), ("A. One", 0.0), ("B", 0.0)])
def test_seed_exact_match(prediction, expected):
    assert seed.score(prediction, ["A", "One", "Two", "Three", "Four"]) == expected


def test_seed_aggregate_image_only():
    rows = [{"score": 1.0, "question_type": "X", "data_type": "image"},
            {"score": 0.0, "question_type": "X", "data_type": "image"},
            {"score": 1.0, "question_type": "Y", "data_type": "image"},
            {"score": 0.0, "question_type": "Y", "data_type": "video"}]  # fmt: skip
    out = seed.aggregate(rows)
    assert out["accuracy"] == pytest.approx(200 / 3) and out["n"] == 3
    assert out["accuracy_by_question_type"] == {"X": 50.0, "Y": 100.0}


# -------------------------------------------------------------------------------------------- scienceqa

PROBLEMS = {
    "1": {"answer": 1, "choices": ["x", "y"], "subject": "natural science", "grade": "grade5", "image": "image.png"},
    "2": {"answer": 0, "choices": ["p", "q"], "subject": "language science", "grade": "grade2", "image": None},
    "3": {"answer": 3, "choices": ["p", "q"], "subject": "social science", "grade": "grade3", "image": "image.png"},
    "4": {"answer": 0, "choices": ["p", "q"], "subject": "social science", "grade": "grade3", "image": "image.png"},
}


def sqa_item(pid, image=True):
    item = {"id": pid, "conversations": [{"from": "human", "value": "Context: N/A\nWhich?\nA. x\nB. y\n<image>"},
                                         {"from": "gpt", "value": "B"}]}  # fmt: skip
    if image:
        item["image"] = f"{pid}/image.png"
    return item


@pytest.fixture
def sqa_truth(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"], "val": ["4"]}))
    return scienceqa.load_truth(str(tmp_path), Reader())


def test_scienceqa_rows(sqa_truth):
    assert sqa_truth["split"] == {"1", "2", "3"}
    row = scienceqa.to_row(sqa_item("1"), "llava-json", sqa_truth, 0)
    assert row["question"] == "Context: N/A\nWhich?\nA. x\nB. y" + SUFFIX  # <image> removed
    assert row["answers"] == ["B", "x", "y"] and row["image_file"] == "1/image.png"
    assert row["question_type"] == "natural science" and "input_error" not in row
    text_only = scienceqa.to_row(sqa_item("2", image=False), "llava-json", sqa_truth, 1)
    assert text_only["input_error"] == scienceqa.TEXT_ONLY and "image_file" not in text_only
    assert "image" not in text_only and "image_b64" not in text_only
    bad = scienceqa.to_row(sqa_item("3"), "llava-json", sqa_truth, 2)
    assert "index 3 names no choice" in bad["input_error"]
    val = scienceqa.to_row(sqa_item("4"), "llava-json", sqa_truth, 3)
    assert val["answers"] is None  # not in the test split: unscored


def test_scienceqa_load_truth_from_problems_file(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    truth = scienceqa.load_truth(str(tmp_path / "problems.json"), Reader())
    assert truth["split"] is None and truth["problems"]["1"]["choices"] == ["x", "y"]
    with pytest.raises(ValueError, match="needs --annotations"):
        scienceqa.load_truth(None, Reader())


def test_scienceqa_hf_parquet_row():
    rec = {"question": "Which?", "choices": ["x", "y", "z"], "answer": 2, "hint": "Read it.", "subject": "s",
           "image": {"bytes": b"img", "path": None}}  # fmt: skip
    row = scienceqa.to_row(rec, "hf-parquet", None, 5)
    assert row["question"] == "Context: Read it.\nWhich?\nA. x\nB. y\nC. z" + SUFFIX
    assert row["answers"] == ["C", "x", "y", "z"] and row["image"] == b"img" and row["id"] == "5"
    no_image = scienceqa.to_row(dict(rec, image=None, hint=""), "hf-parquet", None, 6)
    assert no_image["input_error"] == scienceqa.TEXT_ONLY and no_image["question"].startswith("Which?")


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", 1.0),
        ("B. y", 1.0),
        ("The answer is B.", 1.0),
        ("The answer is B. The answer is A.", 0.0),  # two matches: FAILED
        ("b", 0.0),  # lower case is no letter
        ("B.", 0.0),  # 'X. ' needs the space
        ("A", 0.0),
        ("C", 0.0),  # not among the two choices
        ("", 0.0),
    ],
)
def test_scienceqa_extraction(prediction, expected):
    assert scienceqa.score(prediction, ["B", "x", "y"]) == expected


def test_scienceqa_aggregate():
    rows = [{"score": 1.0, "subject": "a"}, {"score": 1.0, "subject": "a"}, {"score": 0.0, "subject": "b"},
            {"score": 1.0, "subject": "b"}]  # fmt: skip
    out = scienceqa.aggregate(rows)
    assert out["accuracy"] == 75.0 and out["accuracy_by_subject"] == {"a": 100.0, "b": 50.0}


# ------------------------------------------------------------------------------------------------- mmvp


def mmvp_records(tmp_path):
    path = tmp_path / "Questions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerow([1, "Are the wings open or closed?", "(a) Open (b) Closed", "(a)"])
        w.writerow([2, "Are the wings open or closed?", "(a) Open (b) Closed", "(b)"])
        w.writerow([3, "Is the flame round or thin?", "(a) Round (b) Thin", "(c)"])
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mmvp_csv_rows(tmp_path):
    recs = mmvp_records(tmp_path)
    row = mmvp.to_row(recs[0], "mmvp-csv", mmvp.load_truth(None, Reader()), 0)
    assert row["question"] == "Are the wings open or closed? Options:\nA. Open\nB. Closed" + SUFFIX
    assert row["answers"] == ["A", "Open", "Closed"] and row["image_file"] == "MMVP Images/1.jpg"
    assert (row["id"], row["index"], row["options"]) == ("1", 1, "(a) Open (b) Closed")
    assert mmvp.to_row(recs[1], "mmvp-csv", None, 1)["answers"][0] == "B"
    assert "unknown option letter 'C'" in mmvp.to_row(recs[2], "mmvp-csv", None, 2)["input_error"]


@pytest.mark.parametrize(
    "prediction, expected",
    [("A", 1.0), ("(a)", 1.0), ("a.", 1.0), ("The answer is A.", 1.0), ("Open", 1.0), ("Answer: open", 1.0),
     ("B", 0.0), ("Closed", 0.0), ("", 0.0), ("I cannot tell", 0.0), ("A. Open", 0.0)],
)  # fmt: skip
def test_mmvp_rule(prediction, expected):
    assert mmvp.score(prediction, ["A", "Open", "Closed"]) == expected


def test_mmvp_pairs():
    # pairs (1,2) both right; (3,4) one wrong; 5 has no partner (its pair member errored)
    scores = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0}
    out = mmvp.aggregate([{"index": i, "score": s} for i, s in scores.items()])
    assert out["pair_accuracy"] == 50.0 and out["pairs"] == 2 and out["incomplete_pairs"] == 1
    assert out["question_accuracy"] == 80.0 and out["n"] == 5  # 4 of 5


# -------------------------------------------------------------------------------------------- flickr30k


def test_flickr_hf_row():
    rec = {"image": {"bytes": b"img", "path": None}, "caption": ["a", "b", "c", "d", "e"], "img_id": "42",
           "filename": "42.jpg"}  # fmt: skip
    row = flickr30k.to_row(rec, "hf-parquet", None, 0)
    assert row["question"] == flickr30k.PROMPT and row["answers"] == ["a", "b", "c", "d", "e"]
    assert (row["id"], row["img_id"], row["filename"], row["image"]) == ("42", "42", "42.jpg", b"img")
    assert flickr30k.score("a dog", row["answers"]) is None


def test_flickr_llava_jsonl_by_position(tmp_path):
    ann = tmp_path / "annotations-3k.jsonl"
    ann.write_text('{"text": "A dog runs."}\n{"text": ["Two cats.", "Cats sleep."]}\n')
    truth = flickr30k.load_truth(str(ann), Reader())
    rec = {"question_id": 9, "image": "flickr30k-images/123.jpg", "text": "Describe the image briefly."}
    row = flickr30k.to_row(rec, "llava-jsonl", truth, 1)
    assert row["answers"] == ["Two cats.", "Cats sleep."] and row["image_file"] == "flickr30k-images/123.jpg"
    assert row["question"] == "Describe the image briefly." and row["img_id"] == "123"


def test_ptb_like_matches_java_ptb_on_a_hard_line():
    # what pycocoevalcap's PTBTokenizer returned for this line (java 17): brackets stay as -lrb-/-rrb-
    assert flickr30k.ptb_like("The (red) car, don't stop!") == "the -lrb- red -rrb- car do n't stop"
    assert flickr30k.ptb_like('A "big" dog\'s toy...') == "a big dog 's toy"


CORPUS = [  # item 1: the caption equals its reference after tokenization; item 2 shares no n-gram with its own
    {"id": "1", "answers": ["A dog runs fast."], "prediction": "a dog runs fast"},
    {"id": "2", "answers": ["The red car stops here"], "prediction": "zebra eats green grass"},
]


@pytest.mark.parametrize("tokenizer", ["python", "auto"])
def test_flickr_cider_tiny_corpus(tokenizer):
    # CIDEr-D per item = 10 * mean_n cos(n-gram tf-idf vectors) * length penalty (1: same length):
    # item 1 -> 10 (identical vectors for n = 1..4), item 2 -> 0 (no common n-gram); corpus mean 5.0
    if tokenizer == "auto" and shutil.which("java") is None:
        pytest.skip("java not installed")
    out = flickr30k.aggregate(CORPUS, tokenizer=tokenizer)
    assert out["cider"] == pytest.approx(5.0) and out["cider_x100"] == pytest.approx(500.0) and out["n"] == 2
    assert out["tokenizer"] == ("python-ptb-like" if tokenizer == "python" else "ptb")


def test_flickr_cider_falls_back_without_java(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    out = flickr30k.aggregate(CORPUS)
    assert out["tokenizer"] == "python-ptb-like" and out["cider"] == pytest.approx(5.0)
