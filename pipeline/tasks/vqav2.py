"""VQAv2: LLaVA-1.5's prompt and answer processing, the official VQA soft accuracy.

Sources (haotian-liu/LLaVA c121f04): ``scripts/v1_5/eval/vqav2.sh`` (question file
``llava_vqav2_mscoco_test-dev2015.jsonl``, temperature 0, no --max_new_tokens: ``model_vqa_loader.py`` L141's
128), ``scripts/convert_vqav2_for_submission.py`` (each answer through m4c's ``EvalAIAnswerProcessor``, L41-52,
before the EvalAI server scores it with the official script). Test-dev has no public answers: its rows are
unscored. On val (``v2_mscoco_val2014_annotations.json``) the official rule is ``pipeline.scoring.vqa_accuracy``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline.scoring import vqa_accuracy
from pipeline.tasks.common import SHORT_ANSWER, Reader, with_suffix
from pipeline.tasks.textvqa import eval_ai_answer
from pipeline.tasks.yesno import as_int, file_name, image_source, pct

NAME = "vqav2"
FORMATS = ("llava-jsonl", "hf-parquet")
MAX_NEW_TOKENS = 128  # model_vqa_loader.py L141 default; vqav2.sh passes none
HEADLINE = "accuracy_pct"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "acc %"
EXTRA_FIELDS = pa.schema([pa.field("question_id", pa.int64()), pa.field("image_id", pa.int64())])


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """VQAv2's annotations (``v2_mscoco_*_annotations.json``, or a folder holding it and the questions file)
    as question_id -> (the human answers, answer_type, image_id). ``None`` without a file (test-dev)."""
    if not annotations:
        return None
    files = [u for u in read.list(annotations) if u.endswith(".json") and "annotations" in file_name(u)]
    if not files:
        raise ValueError(f"--task vqav2: no *annotations*.json under {annotations}")
    truth: dict[int, tuple[list[str], str | None, int | None]] = {}
    for url in files:
        for a in read.json(url).get("annotations", []):
            answers = [x["answer"] for x in a.get("answers", [])]
            truth[int(a["question_id"])] = (answers, a.get("answer_type"), a.get("image_id"))
    return truth


def _answers(value: Any) -> list[str] | None:
    """A Hugging Face ``answers`` column: a list of {answer, answer_confidence, answer_id} (or of strings)."""
    if value is None:
        return None
    out = [a["answer"] if isinstance(a, dict) else str(a) for a in value]
    return out or None


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A LLaVA VQAv2 question-file line or a lmms-lab/VQAv2 row -> an input row."""
    qid = as_int(record.get("question_id"))
    if fmt == "llava-jsonl":
        text, answers, answer_type, image_id = record.get("text") or "", None, None, None
    elif fmt == "hf-parquet":  # question_id, question, answers, answer_type, image_id, image, ...
        text, answers = record.get("question") or "", _answers(record.get("answers"))
        answer_type, image_id = record.get("answer_type"), as_int(record.get("image_id"))
    else:
        raise ValueError(f"--task vqav2 reads {', '.join(FORMATS)}, not {fmt!r}")
    if truth is not None and qid in truth:
        answers, answer_type, image_id = truth[qid][0] or answers, truth[qid][1], truth[qid][2]
    row: dict[str, Any] = {
        "id": str(qid) if qid is not None else str(index),
        "question": with_suffix(text, SHORT_ANSWER),
        "answers": answers or None,  # test-dev: unscored
        "question_type": answer_type,  # the official script's per-answer-type split: yes/no, number, other
        "question_id": qid,
        "image_id": as_int(image_id),
        **image_source(record, fmt),
    }
    if not text:
        row["input_error"] = "VQAv2 record without a question"
    elif "image" not in row and "image_file" not in row:
        row["input_error"] = "VQAv2 record without an image"
    return row


def score(prediction: str, answers: Sequence[str]) -> float | None:
    """The official soft accuracy of the answer LLaVA uploads: EvalAI's processing first
    (convert_vqav2_for_submission.py L52), then the server's own (``vqa_accuracy``)."""
    if prediction is None or not answers:
        return None
    return vqa_accuracy(eval_ai_answer(prediction), answers)


def aggregate(rows: list[dict]) -> dict:
    """The official overall accuracy and per answer type, in percent (as vqaEval reports them)."""
    scores: list[float] = []
    per_type: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("score") is None:
            continue
        scores.append(float(r["score"]))
        if r.get("question_type"):
            per_type[r["question_type"]].append(float(r["score"]))
    return {
        "accuracy_pct": pct(sum(scores) / len(scores)) if scores else None,
        "n": len(scores),
        "per_answer_type_pct": {k: pct(sum(v) / len(v)) for k, v in sorted(per_type.items())},
    }
