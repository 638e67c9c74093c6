"""MME (perception and cognition yes/no, two questions per image): LLaVA-1.5's prompt, MME's official score.

Sources: haotian-liu/LLaVA c121f04 ``scripts/v1_5/eval/mme.sh`` (question file ``llava_mme.jsonl``, images
``MME_Benchmark_release_version``, temperature 0, no --max_new_tokens: ``model_vqa_loader.py`` L141's 128);
``convert_answer_to_mme.py`` from LLaVA's eval.zip (how an answer finds its ground truth; line numbers of the
unmodified copy the code index holds); MME's official ``eval_tool/calculation.py`` (the parsing and the score;
line numbers of the copy at TideDra/VL-RLHF@4c13000 ``eval/mme/calculation.py``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline.tasks.common import SHORT_ANSWER, Reader, with_suffix
from pipeline.tasks.yesno import file_name, image_source, mme_parse, pct

NAME = "mme"
FORMATS = ("llava-jsonl", "hf-parquet")
MAX_NEW_TOKENS = 128  # model_vqa_loader.py L141 default; mme.sh passes none
HEADLINE = "perception"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "perception score"
# question_id: "<subtask>/<image file>", shared by the two questions of one image
EXTRA_FIELDS = pa.schema([pa.field("question_id", pa.string())])
# calculation.py L9-12
PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO = "Please answer yes or no."


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """MME's ground truth: (subtask, '<image stem>.txt', question) -> "Yes"/"No".

    As convert_answer_to_mme.py's ``get_gt`` (L18-37): a subtask folder holds ``questions_answers_YN/*.txt``
    (beside ``images/``) or its ``*.txt`` beside the images; each line is "question<TAB>answer" (L35). A line
    "image<TAB>question<TAB>answer" (the eval_tool's result layout) is read too. ``None`` without a folder:
    the Hugging Face rows carry their answer."""
    if not annotations:
        return None
    truth: dict[tuple[str, str, str], str] = {}
    for url in read.list(annotations):
        if not url.endswith(".txt"):
            continue
        parts = url.rstrip("/").split("/")
        if len(parts) < 2:
            continue
        category = parts[-3] if parts[-2] == "questions_answers_YN" and len(parts) >= 3 else parts[-2]
        for line in read(url).decode("utf-8").splitlines():
            fields = line.strip().split("\t")
            if len(fields) in (2, 3):
                truth[(category, parts[-1], fields[-2])] = fields[-1]
    return truth


def _lookup(truth: dict, category: str, txt: str, text: str) -> str | None:
    """The answer for LLaVA's prompt ``text``, matched as convert_answer_to_mme.py L64-70 does: the answer
    line removed and the text stripped, " Please answer yes or no." put back, with two spaces where the
    benchmark's file has two."""
    prompt = text
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()  # L64-65
    candidates = [prompt] if YES_NO in prompt else [f"{prompt} {YES_NO}", f"{prompt}  {YES_NO}"]  # L66-69
    for q in candidates:
        if (category, txt, q) in truth:
            return truth[(category, txt, q)]
    return None


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A ``llava_mme.jsonl`` line or a lmms-lab/MME row -> an input row (``id`` unique per question)."""
    qid = str(record.get("question_id") or "")
    category = record.get("category") or (qid.split("/")[0] if "/" in qid else None)  # convert L56
    if fmt == "llava-jsonl":
        text, answer = record.get("text") or "", None
        if truth is not None and qid:
            txt = file_name(qid).split(".")[0] + ".txt"  # convert_answer_to_mme.py L57
            answer = _lookup(truth, qid.split("/")[0], txt, text)
        question = with_suffix(text, SHORT_ANSWER)
    elif fmt == "hf-parquet":  # lmms-lab/MME: question_id, image, question, answer, category
        text, answer = record.get("question") or "", record.get("answer")
        # LLaVA's file drops MME's " Please answer yes or no." for its answer line (as lmms-eval does,
        # tasks/mme/utils.py L37-45 with the default post_prompt of mme.yaml L29)
        question = with_suffix(text.replace(f" {YES_NO}", "").strip(), SHORT_ANSWER)
    else:
        raise ValueError(f"--task mme reads {', '.join(FORMATS)}, not {fmt!r}")
    digest = hashlib.sha1(first_q(text).encode()).hexdigest()[:10]
    row: dict[str, Any] = {
        "id": f"{qid or index}#{digest}",  # the benchmark's id repeats for the two questions of an image
        "question": question,
        "answers": [answer] if answer else None,
        "question_type": category,
        "question_id": qid or None,
        **image_source(record, fmt),
    }
    if not text:
        row["input_error"] = "MME record without a question"
    elif "image" not in row and "image_file" not in row:
        row["input_error"] = "MME record without an image"
    return row


def first_q(text: str) -> str:
    """The question without answer-format lines (stable whatever suffix the record carries)."""
    return text.replace(SHORT_ANSWER, "").replace(YES_NO, "").strip()


def score(prediction: str, answers: list[str]) -> float | None:
    """1.0 where MME's parsing of the prediction equals the (lower-cased) answer; "other" is always wrong
    (calculation.py L118-130)."""
    if prediction is None or not answers:
        return None
    return float(mme_parse(prediction) == answers[0].strip().lower())


def aggregate(rows: list[dict]) -> dict:
    """MME's score (calculation.py L89-151): per subtask acc (over questions, "other" wrong, L52) and acc+ (over
    images: both questions right, L135-140); score = (acc + acc+) * 100 (L144-146); perception and cognition
    are the sums over their subtasks (L150), total their sum.

    The official tool pairs consecutive lines of a subtask's results (L99); here the pair is the two rows that
    share a question_id (the image), which is the same pairing when the file lists an image's questions
    together. An image with one scored question (the other failed) has no acc+ credit."""
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    others: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.get("prediction") is None or not r.get("answers"):
            continue
        task = r.get("question_type") or "unknown"
        by_task[task][r.get("question_id") or r["id"]].append(score(r["prediction"], r["answers"]))
        others[task] += mme_parse(r["prediction"]) == "other"
    subtasks: dict[str, dict[str, Any]] = {}
    for task, images in sorted(by_task.items()):
        scores = [s for pair in images.values() for s in pair]
        acc = sum(scores) / len(scores)
        acc_plus = sum(len(p) == 2 and sum(p) == 2 for p in images.values()) / len(images)
        subtasks[task] = {
            "acc_pct": pct(acc),
            "acc_plus_pct": pct(acc_plus),
            "score": (acc + acc_plus) * 100,
            "questions": len(scores),
            "images": len(images),
            "other_num": others[task],
            "incomplete_images": sum(len(p) != 2 for p in images.values()),
        }
    perception = sum(subtasks[t]["score"] for t in PERCEPTION if t in subtasks)
    cognition = sum(subtasks[t]["score"] for t in COGNITION if t in subtasks)
    return {
        "subtasks": subtasks,
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "missing_subtasks": [t for t in PERCEPTION + COGNITION if t not in subtasks],
    }
