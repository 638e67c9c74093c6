"""SEED-Bench (v1), LLaVA-1.5's image split: LLaVA's question file, exact-match letters, per-type accuracy.

LLaVA (haotian-liu/LLaVA c121f04) runs ``llava/eval/model_vqa_loader.py`` on ``llava-seed-bench.jsonl``
(``scripts/v1_5/eval/seed.sh``) and scores with ``scripts/convert_seed_for_submission.py``: a prediction is
right only when the whole (stripped) reply equals the answer letter (line 34), per question type (lines
22-45), for all, image and video items (lines 60-62). LLaVA-1.5 reports the image number: only items whose
``data_type`` is 'image' get answers here; video items (LLaVA's middle-frame stand-ins) stay unscored.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.tasks.common import OPTION_ANSWER, Reader, image_bytes, require, with_suffix
from pipeline.tasks.options import (
    choice_aggregate,
    choice_answers,
    option_lines,
    parse_option_lines,
)

NAME = "seed"
FORMATS = ("llava-jsonl", "hf-parquet")
MAX_NEW_TOKENS = 128  # model_vqa_loader.py line 141 (default; seed.sh passes none)
HEADLINE = "accuracy"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "image acc %"
EXTRA_FIELDS = pa.schema(
    [
        pa.field("question_id", pa.string()),  # SEED-Bench.json ships question ids as strings
        pa.field("data_type", pa.string()),  # 'image' | 'video'
        pa.field("question_type_id", pa.int64()),
    ]
)
SCORED_DATA_TYPE = "image"  # convert_seed_for_submission.py line 61 (eval_only_type='image')
CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")  # lmms-eval seedbench/utils.py lines 10-13


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """SEED-Bench.json -> {'questions': {question_id: {...}}, 'types': {type id: name}}.

    The JSON's ``question_type`` maps name -> id (convert_seed_for_submission.py line 58 inverts it). For
    ``hf-parquet`` the file is optional: it only names the question types (else the id is the key)."""
    if annotations is None:
        return None
    data = read.json(require(annotations, NAME, "SEED-Bench.json"))
    questions = {
        str(q["question_id"]): {
            "answer": q["answer"],
            "data_type": q.get("data_type"),
            "question_type_id": q.get("question_type_id"),
        }
        for q in data["questions"]
    }
    types = {int(i): str(n) for n, i in data.get("question_type", {}).items()}
    return {"questions": questions, "types": types}


def _type_name(type_id: Any, truth: dict | None, fallback: Any = None) -> str | None:
    if type_id is None:
        return None if fallback is None else str(fallback)
    types = (truth or {}).get("types", {})
    return types.get(int(type_id), str(fallback) if fallback is not None else str(int(type_id)))


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A ``llava-seed-bench.jsonl`` line (with SEED-Bench.json as truth) or an lmms-lab/SEED-Bench row."""
    if fmt == "llava-jsonl":
        if truth is None:
            raise ValueError(f"--task {NAME} --format llava-jsonl needs --annotations: SEED-Bench.json")
        qid = str(record["question_id"])
        gt = truth["questions"].get(qid)
        question = with_suffix(str(record["text"]), OPTION_ANSWER)  # the file's text carries the suffix
        options = parse_option_lines(question)
        row: dict[str, Any] = {"id": qid, "question": question, "image_file": record["image"]}
        type_id = None if gt is None else gt["question_type_id"]
        data_type = None if gt is None else gt["data_type"]
        row["question_type"] = _type_name(type_id, truth, record.get("category"))
    elif fmt == "hf-parquet":
        qid = str(record["question_id"])
        options = [str(record[k]) for k in CHOICE_KEYS if record.get(k) is not None]
        text = f"{record['question']}\n{option_lines(options)}"  # lmms-eval seedbench/utils.py lines 8-14
        data_type, type_id = record.get("data_type"), record.get("question_type_id")
        gt = {"answer": record.get("answer")}
        row = {"id": qid, "question": with_suffix(text, OPTION_ANSWER), "image": image_bytes(record.get("image"))}
        row["question_type"] = _type_name(type_id, truth)
    else:
        raise ValueError(f"--task {NAME} reads {', '.join(FORMATS)}, not {fmt!r}")
    row.update(question_id=qid, data_type=data_type,
               question_type_id=None if type_id is None else int(type_id))  # fmt: skip
    row["answers"] = None
    if gt is not None and data_type == SCORED_DATA_TYPE:
        answers, error = choice_answers(str(gt["answer"]), options)
        row["answers"] = answers
        if error:
            row["input_error"] = error
    if row.get("image") is None and row.get("image_file") is None:
        row["input_error"] = row.get("input_error") or "image: missing"
    return row


def score(prediction: str, answers: list[str]) -> float | None:
    """convert_seed_for_submission.py line 34: the reply (stripped, as model_vqa_loader.py line 116 writes it)
    must equal the answer letter: 'A' is right, 'A.' or 'A. dog' is wrong."""
    if not answers:
        return None
    return 1.0 if (prediction or "").strip() == str(answers[0]).strip() else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Image accuracy (percent) overall and per question type (convert_seed_for_submission.py lines 37-51)."""
    out = choice_aggregate([r for r in rows if r.get("data_type", SCORED_DATA_TYPE) == SCORED_DATA_TYPE])
    out["data_type"] = SCORED_DATA_TYPE
    return out
