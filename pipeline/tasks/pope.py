"""POPE (object hallucination, yes/no): LLaVA-1.5's prompt and answer length, ``eval_pope.py``'s metrics.

Sources (haotian-liu/LLaVA c121f04): ``scripts/v1_5/eval/pope.sh`` (question file ``llava_pope_test.jsonl``,
labels ``coco/coco_pope_{adversarial,popular,random}.json``, temperature 0, no --max_new_tokens, so
``model_vqa_loader.py`` L141's default 128), ``llava/eval/eval_pope.py`` (the rule and the metrics).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from actors.prompt import plain_question
from pipeline.tasks.common import SHORT_ANSWER, Reader, with_suffix
from pipeline.tasks.yesno import (
    as_int,
    file_name,
    image_source,
    json_lines,
    pct,
    pope_yes_no,
    ratio,
)

NAME = "pope"
FORMATS = ("llava-jsonl", "hf-parquet")
MAX_NEW_TOKENS = 128  # model_vqa_loader.py L141 default; pope.sh passes none
HEADLINE = "f1_mean_pct"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "F1 %"
EXTRA_FIELDS = pa.schema([pa.field("question_id", pa.int64()), pa.field("image_name", pa.string())])
CATEGORIES = ("adversarial", "popular", "random")


def _category(url: str) -> str | None:
    """eval_pope.py L75-77: a label file is ``coco_pope_<category>.json``."""
    name = file_name(url)
    if name.startswith("coco_pope_") and name.endswith(".json"):
        return name[len("coco_pope_") : -len(".json")]
    return None


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """POPE's label files (a folder of ``coco_pope_*.json`` or one of them), keyed by (category, image, question).

    eval_pope.py pairs the k-th answer of a category with the k-th line of its label file (L6, L40): the
    label files' own question_ids restart at 1 per file while LLaVA's question file numbers them on. The
    (category, image, question) key gives the same pairs without relying on order. ``None`` without files:
    the Hugging Face rows carry their answer."""
    if not annotations:
        return None
    files = read.list(annotations)
    labelled = [u for u in files if _category(u) is not None] or [
        u for u in files if u.endswith((".json", ".jsonl"))
    ]
    if not labelled:
        raise ValueError(f"--task pope: no coco_pope_*.json under {annotations}")
    by_key: dict[tuple, str] = {}
    any_category: dict[tuple, str] = {}
    for url in labelled:
        category = _category(url)
        for rec in json_lines(read(url)):
            key = (rec["image"], plain_question(rec["text"]))
            by_key[(rec.get("category", category), *key)] = rec["label"]
            any_category[key] = rec["label"]  # an object is in an image or not, whatever the sampling
    return {"by_key": by_key, "any_category": any_category}


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """A LLaVA question-file line or a lmms-lab/POPE row -> an input row."""
    if fmt == "llava-jsonl":
        text, label = record.get("text") or "", record.get("label")
        category = record.get("category")
        if truth is not None and text:
            key = (record.get("image"), plain_question(text))
            found = truth["by_key"].get((category, *key)) if category else None
            label = found or truth["any_category"].get(key) or label
        qid_raw, image_name = record.get("question_id"), record.get("image")
    elif fmt == "hf-parquet":  # lmms-lab/POPE: question_id, question, answer, image, category, image_source
        text, label, category = record.get("question") or "", record.get("answer"), record.get("category")
        qid_raw, image_name = record.get("question_id"), record.get("image_source")
    else:
        raise ValueError(f"--task pope reads {', '.join(FORMATS)}, not {fmt!r}")
    qid = as_int(qid_raw)
    base = str(qid_raw) if qid_raw is not None else str(index)
    row: dict[str, Any] = {
        "id": f"{category}-{base}" if category else base,  # label files' ids restart per category
        "question": with_suffix(text, SHORT_ANSWER),  # LLaVA's file carries the line; with_suffix keeps one
        "answers": [label] if label else None,
        "question_type": category,
        "question_id": qid,
        "image_name": image_name,
        **image_source(record, fmt),
    }
    if not text:
        row["input_error"] = "POPE record without a question"
    elif "image" not in row and "image_file" not in row:
        row["input_error"] = "POPE record without an image"
    return row


def _label_yes(label: str) -> bool:
    return label != "no"  # eval_pope.py L22-26: 'no' -> 0, anything else -> 1


def score(prediction: str, answers: list[str]) -> float | None:
    """1.0 where eval_pope.py's yes/no reading of the prediction equals the label."""
    if prediction is None or not answers:
        return None
    return float((pope_yes_no(prediction) == "yes") == _label_yes(answers[0]))


def _metrics(pairs: list[tuple[bool, bool]]) -> dict[str, Any]:
    """eval_pope.py L35-61 for one category: (predicted yes, label yes) pairs -> its five numbers."""
    tp = sum(p and g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    tn = sum(not p and not g for p, g in pairs)
    fn = sum(not p and g for p, g in pairs)
    precision = ratio(tp, tp + fp)  # L53; the script raises ZeroDivisionError there: None here
    recall = ratio(tp, tp + fn)  # L54
    f1 = (
        None if precision is None or recall is None else ratio(2 * precision * recall, precision + recall)
    )  # L55
    return {
        "n": len(pairs),
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy_pct": pct(ratio(tp + tn, len(pairs))),  # L56
        "precision_pct": pct(precision),
        "recall_pct": pct(recall),
        "f1_pct": pct(f1),
        "yes_ratio_pct": pct(ratio(sum(p for p, _ in pairs), len(pairs))),  # L37: predicted yes / all
    }


def aggregate(rows: list[dict]) -> dict:
    """Per category (eval_pope.py L74-80) the script's five numbers, in percent; and their plain means over
    the categories present (LLaVA-1.5 reports POPE as the F1 averaged over the three: ``f1_mean_pct``). A mean
    is None where one category's number is (a zero division the script would crash on)."""
    pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r in rows:
        if r.get("prediction") is None or not r.get("answers"):
            continue
        pairs[r.get("question_type") or "all"].append(
            (pope_yes_no(r["prediction"]) == "yes", _label_yes(r["answers"][0]))
        )
    per = {c: _metrics(p) for c, p in sorted(pairs.items())}
    out: dict[str, Any] = {"per_category": per, "n": sum(m["n"] for m in per.values())}
    for key in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        values = [m[f"{key}_pct"] for m in per.values()]
        out[f"{key}_mean_pct"] = None if not values or None in values else sum(values) / len(values)
    return out
