"""MMVP: ACCM's prompt and rule-based grading; pair accuracy as the benchmark defines it.

MMVP's own scripts (tsb0601/MMVP 7635005) prompt with 'question (a) x (b) y' (``scripts/evaluate_mllm.py``
line 59) and grade with GPT-4 (``scripts/gpt_grader.py``), which cannot be reproduced offline. ACCM
(ASGO-MM/ACCM 93e1ca2), whose numbers this pipeline replicates, prompts LLaVA-1.5 with 'A. / B.' lines and the
option-letter line (``llava/eval/mmvp/mmvp_eval.py`` lines 44-53, 208) and grades by rule
(``llava/eval/mmvp/mmvp_test.py`` lines 22-58): both are followed here.

Pairs: questions 2k and 2k+1 of Questions.csv (Index 2k+1 and 2k+2) ask the same thing of two images; a pair
counts only when both are right (gpt_grader.py lines 59-69, mmvp_test.py lines 49-57). As in lmms-eval
(``lmms_eval/tasks/mmvp/utils.py`` lines 241-253) a pair with a member missing (an errored row) is left out.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline.tasks.common import OPTION_ANSWER, Reader, image_bytes, with_suffix
from pipeline.tasks.options import accuracy, choice_answers, option_lines, split_answers

NAME = "mmvp"
FORMATS = ("mmvp-csv", "hf-parquet")
MAX_NEW_TOKENS = 512  # ACCM mmvp_eval.py line 215 (--max_new_tokens default; mmvp.sh passes none)
HEADLINE = "pair_accuracy"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "pair acc %"
EXTRA_FIELDS = pa.schema([pa.field("index", pa.int64()), pa.field("options", pa.string())])
IMAGE_DIR = "MMVP Images"  # evaluate_mllm.py line 74: '<dir>/MMVP Images/<Index>.jpg'
_MARK = re.compile(r"\(([a-z])\)", re.IGNORECASE)
_ANSWER_KEYWORDS = ("answer is", "answer is:", "answer:")  # mmvp_test.py line 24


def load_truth(annotations: str | None, read: Reader) -> None:
    """None: Questions.csv carries each answer."""
    return None


def parse_options(options: str) -> list[str]:
    """'(a) Open (b) Closed' -> ['Open', 'Closed'] (what ACCM's ``give_options``, mmvp_eval.py 85-88, yields)."""
    parts = _MARK.split(options or "")
    return [parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)]


def build_question(question: str, options: list[str]) -> str:
    """mmvp_eval.py lines 44-53: '<question> Options:', one 'A. ...' line per option, the answer-format line."""
    return with_suffix(f"{str(question).strip()} Options:\n{option_lines(options)}", OPTION_ANSWER)


def _get(record: dict, *keys: str) -> Any:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A Questions.csv row (Index, Question, Options, Correct Answer) or an lmms-lab-eval/MMVP row."""
    if fmt not in FORMATS:
        raise ValueError(f"--task {NAME} reads {', '.join(FORMATS)}, not {fmt!r}")
    # ACCM's reader skips a header spelled 'lndex' as well as 'Index' (mmvp_eval.py lines 125-128)
    raw_index = _get(record, "Index", "lndex", "index", "idx")
    idx = int(raw_index) if raw_index is not None else index + 1
    options_raw = str(_get(record, "Options", "options") or "")
    options = parse_options(options_raw)
    correct = str(_get(record, "Correct Answer", "answer") or "").strip().lower()
    # mmvp_test.py line 47: the letter is the character after '(' in '(a)'; lmms-eval also accepts a bare 'a'
    letter = correct[1] if len(correct) >= 2 and correct[0] == "(" else correct
    answers, error = choice_answers(letter.upper(), options)
    row: dict[str, Any] = {
        "id": str(idx),
        "question": build_question(str(_get(record, "Question", "question") or ""), options),
        "answers": answers,
        "question_type": None,  # Questions.csv names no visual pattern
        "index": idx,
        "options": options_raw,
    }
    if len(options) < 2:
        error = error or f"options: expected '(a) ... (b) ...', got {options_raw!r}"
    if fmt == "mmvp-csv":
        row["image_file"] = f"{IMAGE_DIR}/{idx}.jpg"
    else:
        row["image"] = image_bytes(record.get("image"))
        if row["image"] is None:
            error = error or "image: missing"
    if error:
        row["input_error"] = error
    return row


def extract(text: str) -> str:
    """mmvp_test.py lines 22-30: lower-case; keep what follows an 'answer is'/'answer:'; trim '.:,' and '()'."""
    text = (text or "").lower().strip()
    for keyword in _ANSWER_KEYWORDS:
        if keyword in text:
            text = text.split(keyword)[-1]
    return text.strip().rstrip(".:,").lstrip("(").rstrip(")")


def score(prediction: str, answers: list[str]) -> float | None:
    """mmvp_test.py line 49: right when the extracted reply is the letter or the right option's text."""
    letter, options = split_answers(answers)
    if not letter:
        return None
    got = extract(prediction)
    k = ord(letter) - ord("A")
    text = options[k].lower() if 0 <= k < len(options) else None
    return 1.0 if got == letter.lower() or (text is not None and got == text) else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Pair accuracy (percent: both questions of a pair right) and question accuracy (percent)."""
    scored = [r for r in rows if r.get("score") is not None]
    pairs: dict[int, list[float]] = defaultdict(list)
    for r in scored:
        pairs[(int(r["index"]) - 1) // 2].append(float(r["score"]))
    complete = [s for s in pairs.values() if len(s) == 2]
    q_acc, n = accuracy(r["score"] for r in scored)
    return {
        "pair_accuracy": 100.0 * sum(all(v == 1.0 for v in s) for s in complete) / len(complete) if complete else None,
        "pairs": len(complete),
        "incomplete_pairs": sum(1 for s in pairs.values() if len(s) != 2),
        "question_accuracy": q_acc,
        "n": n,
    }
