"""TextVQA (reading text in images, val 0.5.1): LLaVA-1.5's prompt (OCR reference tokens) and its m4c accuracy.

Sources (haotian-liu/LLaVA c121f04): ``scripts/v1_5/eval/textvqa.sh`` (question file
``llava_textvqa_val_v051_ocr.jsonl``, ``TextVQA_0.5.1_val.json``, temperature 0, no --max_new_tokens:
``model_vqa_loader.py`` L141's 128), ``llava/eval/eval_textvqa.py`` (matching, percent) and
``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``, ``TextVQAAccuracyEvaluator``).

The m4c rule is not VQAv2's official one: it first lower-cases and drops every ',' and '?' and splits "'s"
(``word_tokenize``, L181-184), and it normalizes *all* ten human answers the same way (L229), where the VQAv2
script leaves identical answer sets alone. Its punctuation, number and contraction tables equal
``pipeline.scoring``'s (checked one by one), so those steps are reused from there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline.scoring import process_digit_article, process_punctuation
from pipeline.tasks.common import SHORT_ANSWER, Reader, with_suffix
from pipeline.tasks.yesno import as_int, file_name, image_source, pct

NAME = "textvqa"
FORMATS = ("llava-jsonl", "hf-parquet")
MAX_NEW_TOKENS = 128  # model_vqa_loader.py L141 default; textvqa.sh passes none
HEADLINE = "accuracy_pct"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "acc %"
LLAVA_QUESTION_ID = "image_id"  # LLaVA's TextVQA file and eval_textvqa.py key answers by image id
EXTRA_FIELDS = pa.schema([pa.field("question_id", pa.int64()), pa.field("image_id", pa.string())])
OCR_PREFIX = "Reference OCR token: "


def eval_ai_answer(text: str) -> str:
    """m4c_evaluator.py ``EvalAIAnswerProcessor.__call__`` (L213-218): word_tokenize (L181-184: lower-case,
    drop ',' and '?', "'s" -> " 's", strip), newline/tab -> space, strip, punctuation, digits/articles.
    (LLaVA also runs VQAv2 predictions through it before upload: convert_vqav2_for_submission.py L52.)"""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _bare_question(prompt: str) -> str | None:
    """eval_textvqa.py ``prompt_processor`` (L17-32): the question part of LLaVA's prompt, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return match.group(1).lower() if match else None
    if OCR_PREFIX in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith(OCR_PREFIX.strip()) else lines[0]).lower()
    return lines[0].lower() if len(lines) <= 2 else None  # L27-28 (a bare question has one line)


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """``TextVQA_0.5.1_val.json`` ({"data": [{question_id, image_id, question, answers, ...}]}) as
    {"answers": qid -> answers or None (the test file has none), "by_image_question": (image_id,
    question.lower()) -> qid}: eval_textvqa.py L38-39 matches a result by image and lower-cased question."""
    if not annotations:
        return None
    files = [u for u in read.list(annotations) if u.endswith(".json")]
    if not files:
        raise ValueError(f"--task textvqa: no TextVQA_*.json under {annotations}")
    answers: dict[int, list[str] | None] = {}
    by_iq: dict[tuple[str, str], int] = {}
    for url in files:
        for a in read.json(url).get("data", []):
            answers[int(a["question_id"])] = list(a["answers"]) if a.get("answers") else None
            by_iq[(str(a["image_id"]), a["question"].lower())] = int(a["question_id"])
    return {"answers": answers, "by_image_question": by_iq}


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A ``llava_textvqa_val_v051_ocr.jsonl`` line or a lmms-lab/textvqa row -> an input row."""
    qid: int | None = None
    if fmt == "llava-jsonl":
        text, answers = record.get("text") or "", None
        raw_qid = record.get("question_id")
        # LLaVA's file puts the image id in question_id (eval_textvqa.py L44 looks it up as image_id)
        image_id = record.get("image_id") or (raw_qid if isinstance(raw_qid, str) else None)
        image_id = image_id or (file_name(record["image"]).rsplit(".", 1)[0] if record.get("image") else None)
        qid = as_int(raw_qid)
        if truth is not None:
            found = truth["by_image_question"].get((str(image_id), _bare_question(text) or ""))
            qid = found if found is not None else (qid if qid in truth["answers"] else None)
            answers = truth["answers"].get(qid) if qid is not None else None
        question = with_suffix(text, SHORT_ANSWER)
    elif fmt == "hf-parquet":  # question_id, image_id, question, answers, ocr_tokens, image, ...
        qid, image_id, text = (
            as_int(record.get("question_id")),
            record.get("image_id"),
            record.get("question") or "",
        )
        answers = list(record["answers"]) if record.get("answers") is not None else None
        if answers is None and truth is not None and qid is not None:
            answers = truth["answers"].get(qid)
        ocr = record.get("ocr_tokens")
        # LLaVA's question file: the question capitalized, its Rosetta OCR tokens on a reference line, then
        # the answer line (eval_textvqa.py L22-26 reads that layout; lmms-eval writes it the same way,
        # textvqa/utils.py L53-54, ``str.capitalize`` included)
        text = text.strip().capitalize()
        body = f"{text}\n{OCR_PREFIX}{', '.join(ocr)}" if ocr is not None and len(ocr) else text
        question = with_suffix(body, SHORT_ANSWER)
    else:
        raise ValueError(f"--task textvqa reads {', '.join(FORMATS)}, not {fmt!r}")
    row: dict[str, Any] = {
        "id": str(qid) if qid is not None else str(record.get("question_id", index)),
        "question": question,
        "answers": answers or None,
        "question_type": None,
        "question_id": qid,
        "image_id": str(image_id) if image_id is not None else None,
        **image_source(record, fmt),
    }
    if not text:
        row["input_error"] = "TextVQA record without a question"
    elif "image" not in row and "image_file" not in row:
        row["input_error"] = "TextVQA record without an image"
    return row


def score(prediction: str, answers: Sequence[str]) -> float | None:
    """m4c ``TextVQAAccuracyEvaluator`` (L225-257): prediction and every answer through ``eval_ai_answer``;
    the mean over the answers of min(1, matches among the other answers / 3)."""
    if prediction is None or not answers:
        return None
    pred = eval_ai_answer(prediction)
    gts = [eval_ai_answer(a) for a in answers]
    total = sum(g == pred for g in gts)
    return sum(min(1.0, (total - (g == pred)) / 3.0) for g in gts) / len(gts)


def aggregate(rows: list[dict]) -> dict:
    """The mean score in percent (eval_textvqa.py L51 prints ``100 * accuracy``)."""
    scores = [float(r["score"]) for r in rows if r.get("score") is not None]
    return {"accuracy_pct": pct(sum(scores) / len(scores)) if scores else None, "n": len(scores)}
