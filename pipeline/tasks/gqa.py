"""GQA (compositional VQA, test-dev balanced): LLaVA-1.5's prompt, answer clean-up and GQA's exact match.

Sources: haotian-liu/LLaVA c121f04 ``scripts/v1_5/eval/gqa.sh`` (question file
``llava_gqa_testdev_balanced.jsonl``, temperature 0, no --max_new_tokens: ``model_vqa_loader.py`` L141's 128;
the official ``eval/eval.py --tier testdev_balanced`` scores it), ``scripts/convert_gqa_for_eval.py`` (the
clean-up), and GQA's ``eval.py`` (as patched by LLaVA's gist db6eddc2, its scoring loop: exact string match,
balanced questions only, "open" = structural type "query", accuracy per structural and semantic type).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline.tasks.common import SHORT_ANSWER, Reader, with_suffix
from pipeline.tasks.yesno import file_name, image_source, pct

NAME = "gqa"
FORMATS = ("llava-jsonl", "hf-parquet")
MAX_NEW_TOKENS = 128  # model_vqa_loader.py L141 default; gqa.sh passes none
HEADLINE = "accuracy_pct"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "acc %"
EXTRA_FIELDS = pa.schema(
    [
        pa.field("question_id", pa.string()),  # GQA's ids are strings ("20968379", "201307251")
        pa.field("image_id", pa.string()),
        pa.field("semantic_type", pa.string()),
        pa.field("is_balanced", pa.bool_()),
    ]
)


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """GQA's questions file (``testdev_balanced_questions.json``: qid -> {answer, types, isBalanced, imageId,
    ...}; a folder: every ``*questions*.json`` in it, as eval.py's ``loadFile`` merges chunks) as
    qid -> (answer or None, structural type, semantic type, isBalanced, imageId)."""
    if not annotations:
        return None
    files = [u for u in read.list(annotations) if u.endswith(".json") and "questions" in file_name(u)]
    if not files:
        raise ValueError(f"--task gqa: no *questions*.json under {annotations}")
    truth: dict[str, tuple] = {}
    for url in files:
        for qid, q in read.json(url).items():
            types = q.get("types") or {}
            truth[str(qid)] = (
                q.get("answer"),
                types.get("structural"),
                types.get("semantic"),
                q.get("isBalanced", True),
                q.get("imageId"),
            )
    return truth


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A ``llava_gqa_testdev_balanced.jsonl`` line or a lmms-lab/GQA ``testdev_balanced_instructions`` row."""
    if fmt == "llava-jsonl":
        qid, text = record.get("question_id"), record.get("text") or ""
        answer, types, balanced, image_id = None, {}, None, None
        image = image_source(record, fmt)
    elif (
        fmt == "hf-parquet"
    ):  # id, imageId, question, answer, types{structural, semantic, detailed}, isBalanced
        qid, text = record.get("id", record.get("question_id")), record.get("question") or ""
        answer, types, balanced = record.get("answer"), record.get("types") or {}, record.get("isBalanced")
        image_id = record.get("imageId")
        # the instructions config has no image column (lmms-eval joins testdev_balanced_images by imageId,
        # gqa/utils.py L6-18): a row without one points at GQA's image folder instead
        image = image_source(record, fmt) or ({"image_file": f"{image_id}.jpg"} if image_id else {})
    else:
        raise ValueError(f"--task gqa reads {', '.join(FORMATS)}, not {fmt!r}")
    qid = str(qid) if qid is not None else None
    structural, semantic = types.get("structural"), types.get("semantic")
    if truth is not None and qid in truth:
        t_answer, structural, semantic, balanced, t_image = truth[qid]
        answer, image_id = t_answer if t_answer is not None else answer, image_id or t_image
    row: dict[str, Any] = {
        "id": qid if qid is not None else str(index),
        "question": with_suffix(text, SHORT_ANSWER),
        "answers": [answer] if answer is not None else None,  # test-dev without answers: unscored
        "question_type": structural,
        "question_id": qid,
        "image_id": image_id or None,
        "semantic_type": semantic,
        "is_balanced": balanced,
        **image,
    }
    if not text:
        row["input_error"] = "GQA record without a question"
    elif not image:
        row["input_error"] = "GQA record without an image"
    return row


def clean(prediction: str) -> str:
    """The prediction as GQA's eval.py receives it from LLaVA: the model's text stripped (model_vqa_loader.py
    L116), then trailing periods cut and lower-cased (convert_gqa_for_eval.py L14). Nothing else: "yes, it is"
    and "yes ." stay wrong."""
    return prediction.strip().rstrip(".").lower()


def score(prediction: str, answers: list[str]) -> float | None:
    """1.0 where the cleaned prediction equals GQA's answer exactly (eval.py: ``correct = predicted == gold``;
    the gold answer is compared as it is shipped)."""
    if prediction is None or not answers:
        return None
    return float(clean(prediction) == answers[0])


def aggregate(rows: list[dict]) -> dict:
    """eval.py's accuracy over the balanced questions (isBalanced; the test-dev balanced file has only those)
    in percent, with its "binary"/"open" split ("open" = structural type "query") and per structural and
    semantic type."""
    overall: list[float] = []
    split: dict[str, list[float]] = defaultdict(list)
    structural: dict[str, list[float]] = defaultdict(list)
    semantic: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("score") is None or r.get("is_balanced") is False:
            continue
        s = float(r["score"])
        overall.append(s)
        kind = r.get("question_type")
        if kind is not None:
            split["open" if kind == "query" else "binary"].append(s)
            structural[kind].append(s)
        if r.get("semantic_type") is not None:
            semantic[r["semantic_type"]].append(s)

    def mean_pct(values: list[float]) -> float | None:
        return pct(sum(values) / len(values)) if values else None

    return {
        "accuracy_pct": mean_pct(overall),
        "n": len(overall),
        "binary_pct": mean_pct(split["binary"]),
        "open_pct": mean_pct(split["open"]),
        "per_structural_type_pct": {k: mean_pct(v) for k, v in sorted(structural.items())},
        "per_semantic_type_pct": {k: mean_pct(v) for k, v in sorted(semantic.items())},
    }
