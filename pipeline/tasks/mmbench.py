"""MMBench (dev): LLaVA-1.5's prompt, MMBench's own answer extraction, single pass.

Prompt: haotian-liu/LLaVA c121f04 ``llava/eval/model_vqa_mmbench.py`` (hint line, question, 'A. ...' lines for
the options present, then the answer-format line; ``scripts/v1_5/eval/mmbench.sh`` passes
``--single-pred-prompt``). LLaVA itself uploads the raw text (``scripts/convert_mmbench_for_submission.py``);
the score here is the official evaluator's rule-based step (``can_infer``: option letter, else a unique option
text), as ported in EvolvingLMMs-Lab/lmms-eval 75571cfe ``lmms_eval/tasks/mmbench/mmbench_evals.py``, run
once per row: no ChatGPT fallback, no circular evaluation (a row whose index >= 1e6 -- a circular copy in
the dev TSV -- counts as one more question).

ACCM's side path: ACCM's ``model_vqa_mmbench.py`` (ASGO-MM/ACCM 93e1ca2, lines 123-126) gives it the text
with the hint removed; the pipeline reads the question's first line, which is the hint when there is one.
"""

from __future__ import annotations

import string
from typing import Any

import pyarrow as pa

from pipeline.tasks.common import OPTION_ANSWER, Reader, image_bytes, with_suffix
from pipeline.tasks.options import (
    choice_aggregate,
    choice_answers,
    is_none,
    option_lines,
    split_answers,
)

NAME = "mmbench"
FORMATS = ("mmbench-tsv", "hf-parquet")
MAX_NEW_TOKENS = 1024  # model_vqa_mmbench.py line 120 (max_new_tokens=1024)
HEADLINE = "accuracy"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "acc %"
OPTION_KEYS = ("A", "B", "C", "D")  # model_vqa_mmbench.py line 19
EXTRA_FIELDS = pa.schema(
    [
        pa.field("index", pa.int64()),  # the TSV's question index (circular copies: index + k * 1e6)
        *(pa.field(k, pa.string()) for k in OPTION_KEYS),  # None where the question has fewer options
        pa.field("category", pa.string()),
        pa.field("l2_category", pa.string()),  # TSV 'l2-category', HF 'L2-category'
    ]
)
CIRCULAR_OFFSET = 1_000_000  # mmbench_evals.py line 275: index < 1e6 is a main question


def load_truth(annotations: str | None, read: Reader) -> None:
    """None: every MMBench row carries its answer letter."""
    return None


def _options(record: dict) -> list[str]:
    """LLaVA's ``get_options`` (model_vqa_mmbench.py lines 44-51): A, B, ... up to the first missing one."""
    out = []
    for key in OPTION_KEYS:
        value = record.get(key)
        if is_none(value):
            break
        out.append(str(value))
    return out


def build_question(question: str, hint: Any, options: list[str]) -> str:
    """model_vqa_mmbench.py lines 85-88 (hint + '\\n' + question, then '\\n<L>. <option>'), line 99 (suffix)."""
    text = str(question)
    if not is_none(hint):
        text = f"{hint}\n{text}"
    if options:
        text = f"{text}\n{option_lines(options)}"
    return with_suffix(text, OPTION_ANSWER)


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """One MMBench TSV row (strings) or lmms-lab/MMBench Parquet row -> an input row."""
    if fmt not in FORMATS:
        raise ValueError(f"--task {NAME} reads {', '.join(FORMATS)}, not {fmt!r}")
    options = _options(record)
    answers, error = choice_answers(str(record.get("answer") or ""), options)
    l2 = record.get("l2-category", record.get("L2-category"))
    row: dict[str, Any] = {
        "id": str(record["index"]),
        "question": build_question(record["question"], record.get("hint"), options),
        "answers": answers,
        "question_type": None if is_none(record.get("category")) else str(record["category"]),
        "index": int(float(record["index"])),
        **{k: (options[i] if i < len(options) else None) for i, k in enumerate(OPTION_KEYS)},
        "category": None if is_none(record.get("category")) else str(record["category"]),
        "l2_category": None if is_none(l2) else str(l2),
    }
    if fmt == "mmbench-tsv":
        row["image_b64"] = record.get("image") or None
    else:
        row["image"] = image_bytes(record.get("image"))
    if row.get("image_b64") is None and row.get("image") is None:
        error = error or "image: missing"
    if error:
        row["input_error"] = error
    return row


def _count(splits: list[str], choices: str, prefix: str = "", suffix: str = "") -> int:
    return sum(1 for c in choices if prefix + c + suffix in splits)


def can_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """mmbench_evals.py lines 79-105: a lone letter among the words, bare or wrapped ('A.', '(A)', ':A', ...).

    Kept as the evaluator does it: letters A-E are counted, and a lone bare 'A' in a reply longer than three
    words is taken for an article (the bare-letter pass stops, the wrapped forms are still tried)."""
    choices = string.ascii_uppercase[:num_choice]
    splits = [x.strip() for x in answer.split()]
    if _count(splits, choices) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    wraps = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
             (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]  # fmt: skip  # line 99
    for pre, post in wraps:
        if _count(splits, choices, pre, post) == 1:
            for ch in choices:
                if pre + ch + post in splits:
                    return ch
    return None


def can_infer_text(answer: str, options: list[str]) -> str | None:
    """mmbench_evals.py lines 107-119: the one option whose (lower-cased) text occurs in the reply."""
    low = answer.lower()
    hits = [OPTION_KEYS[i] for i, text in enumerate(options[: len(OPTION_KEYS)]) if str(text).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract(prediction: str, options: list[str]) -> str | None:
    """mmbench_evals.py lines 121-123 (``can_infer``): the option letter, else the option text."""
    return can_infer_option(prediction) or can_infer_text(prediction, options)


def score(prediction: str, answers: list[str]) -> float | None:
    """1.0 when the extracted letter is the answer (mmbench_evals.py line 214: a hit is PRED == GT)."""
    letter, options = split_answers(answers)
    if not letter:
        return None
    return 1.0 if extract(prediction or "", options) == letter else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Accuracy (percent) overall, per category and per L2 category (mmbench_evals.py lines 236-249)."""
    out = choice_aggregate(rows, "category", "l2_category")
    out["circular_copies"] = sum(1 for r in rows if (r.get("index") or 0) >= CIRCULAR_OFFSET)
    out["rule"] = "single pass, can_infer (option letter, else option text); no ChatGPT, no circular eval"
    return out
