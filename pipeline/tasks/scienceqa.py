"""ScienceQA (test, LLaVA-1.5's CQM-A file): LLaVA's prompt and its letter extraction.

LLaVA (haotian-liu/LLaVA c121f04) runs ``llava/eval/model_vqa_science.py`` on ``llava_test_CQM-A.json``
with ``--single-pred-prompt`` (``scripts/v1_5/eval/sqa.sh``) and scores with
``llava/eval/eval_science_qa.py`` against ScienceQA's ``problems.json`` / ``pid_splits.json``.

Text-only questions: LLaVA runs them without an image (model_vqa_science.py lines 47-60) and counts them in
its 'Accuracy'. The LVLM here always takes an image, so such a row gets ``input_error`` and is not scored:
``aggregate``'s accuracy is LLaVA's 'IMG-Accuracy' (eval_science_qa.py lines 99-105), the number LLaVA-1.5
reports for SQA-IMG.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from pipeline.tasks.common import OPTION_ANSWER, Reader, image_bytes, require, with_suffix
from pipeline.tasks.options import (
    LETTERS,
    choice_aggregate,
    choice_answers,
    option_lines,
    split_answers,
)

NAME = "scienceqa"
FORMATS = ("llava-json", "hf-parquet")
MAX_NEW_TOKENS = 1024  # model_vqa_science.py line 80 (max_new_tokens=1024)
HEADLINE = "accuracy"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "IMG acc %"
EXTRA_FIELDS = pa.schema([pa.field("subject", pa.string()), pa.field("grade", pa.string())])
SPLIT = "test"  # eval_science_qa.py line 14 (--split default)
TEXT_ONLY = "image: none (text-only question; the LVLM here needs an image)"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py line 70, its unescaped '.' kept


def load_truth(annotations: str | None, read: Reader) -> dict:
    """problems.json (+ pid_splits.json beside it, if any) -> {'problems': {pid: ...}, 'split': set | None}.

    ``--annotations`` is the folder LLaVA's ``--base-dir`` names (eval_science_qa.py lines 43-44) or the
    problems.json file itself (then every problem counts)."""
    url = require(annotations, NAME, "ScienceQA's problems.json (or its folder with pid_splits.json)")
    files = read.list(url)
    problems_url = next((f for f in files if f.endswith("problems.json")), None)
    if problems_url is None:
        raise ValueError(f"--task {NAME}: no problems.json under {url}")
    splits_url = next((f for f in files if f.endswith("pid_splits.json")), None)
    problems = {
        str(pid): {"answer": int(p["answer"]), "choices": [str(c) for c in p["choices"]],
                   "subject": p.get("subject"), "grade": p.get("grade")}  # fmt: skip
        for pid, p in read.json(problems_url).items()
    }
    split = None if splits_url is None else {str(p) for p in read.json(splits_url)[SPLIT]}
    return {"problems": problems, "split": split}


def _answers(answer: int, choices: list[str]) -> tuple[list[str], str | None]:
    if not 0 <= answer < len(choices):
        return [str(answer), *choices], f"answer: index {answer} names no choice ({len(choices)} choices)"
    return choice_answers(LETTERS[answer], choices)


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A ``llava_test_CQM-A.json`` item (truth: problems.json) or an lmms-lab/ScienceQA Parquet row."""
    row: dict[str, Any]
    if fmt == "llava-json":
        pid = str(record["id"])
        human = next(c["value"] for c in record["conversations"] if c.get("from") == "human")
        text = human.replace("<image>", "").strip()  # model_vqa_science.py line 44
        row = {"id": pid, "question": with_suffix(text, OPTION_ANSWER)}  # line 63 (--single-pred-prompt)
        prob = (truth or {}).get("problems", {}).get(pid)
        split = (truth or {}).get("split")
        row["answers"], error = None, None
        if prob is not None and (split is None or pid in split):  # eval_science_qa.py line 47
            row["answers"], error = _answers(prob["answer"], prob["choices"])
        row["subject"] = None if prob is None else prob["subject"]
        row["grade"] = None if prob is None else prob["grade"]
        if record.get("image"):
            row["image_file"] = record["image"]  # relative to --image-root (LLaVA's images/test)
    elif fmt == "hf-parquet":
        choices = [str(c) for c in record["choices"]]
        hint = record.get("hint")
        context = f"Context: {hint}\n" if hint else ""  # lmms-eval scienceqa/utils.py lines 7-12
        text = f"{context}{record['question']}\n{option_lines(choices)}"
        row = {"id": str(record.get("id", index)), "question": with_suffix(text, OPTION_ANSWER)}
        row["answers"], error = _answers(int(record["answer"]), choices)  # utils.py lines 28-31
        row["subject"], row["grade"] = record.get("subject"), record.get("grade")
        data = image_bytes(record.get("image"))
        if data is not None:
            row["image"] = data
    else:
        raise ValueError(f"--task {NAME} reads {', '.join(FORMATS)}, not {fmt!r}")
    row["question_type"] = row["subject"]
    if "image" not in row and "image_file" not in row:
        error = TEXT_ONLY
    if error:
        row["input_error"] = error
    return row


def extract(prediction: str) -> str:
    """eval_science_qa.py lines 65-75: the whole reply a letter, else 'X. ...', else one 'The answer is X.'."""
    text = prediction or ""
    if text in tuple(LETTERS):  # a list in LLaVA: '' or 'AB' is no letter
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score(prediction: str, answers: list[str]) -> float | None:
    """1.0 when the extracted letter is among the problem's choices and is the answer (lines 28-35, 91)."""
    letter, choices = split_answers(answers)
    if not letter:
        return None
    got = extract((prediction or "").strip())  # model_vqa_science.py line 84 strips the reply
    valid = LETTERS[: len(choices)] if choices else LETTERS
    return 1.0 if got in valid and got == letter else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Accuracy (percent) over the image questions (LLaVA's IMG-Accuracy), overall and per subject."""
    out = choice_aggregate(rows, "subject")
    out["note"] = "image questions only (text-only ones are input errors): LLaVA's IMG-Accuracy"
    return out
