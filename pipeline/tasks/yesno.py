"""What the VQA and yes/no tasks (vqav2, textvqa, gqa, pope, mme) share: the Hugging Face image column, the
bare question of a LLaVA prompt, ids typed as the benchmark ships them, and the two official yes/no parsers.

The parsers differ on purpose: POPE and MME read a free-form answer differently, and each benchmark's numbers
are only comparable when its own rule is applied.
"""

from __future__ import annotations

from typing import Any

from pipeline.tasks.common import image_bytes


def image_source(record: dict, fmt: str, key: str = "image") -> dict[str, Any]:
    """The row's image: ``image_file`` (LLaVA question files) or ``image`` bytes (a Hugging Face image column,
    ``{"bytes", "path"}``; raw bytes are taken as they are). ``{}`` when the record has none."""
    value = record.get(key)
    if fmt == "llava-jsonl":
        return {"image_file": value} if isinstance(value, str) and value else {}
    if isinstance(value, (dict, bytes, bytearray)):
        data = image_bytes(value)
        if data:
            return {"image": data}
        if isinstance(value, dict) and value.get("path"):
            return {"image_file": value["path"]}
    return {}


def as_int(value: Any) -> int | None:
    """``value`` as an int where it is one (Parquet may ship an int id as a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def file_name(url: str) -> str:
    """The last path component of a path or URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def json_lines(data: bytes) -> list[dict]:
    """A JSON-lines file (POPE's ``coco_pope_*.json`` are JSON lines despite the name)."""
    import json

    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def pope_yes_no(prediction: str) -> str:
    """POPE's reading of a free-form answer, as LLaVA's ``llava/eval/eval_pope.py`` does it (L11-20).

    The model's text is stripped first (``model_vqa_loader.py`` L116 strips every output). Only the text before
    the first '.' counts (L12-13); commas go (L15); the words are split on single spaces (L16, so "no\\n" is not
    the word "no"); any word "No", "not" or "no" means "no" (L17-18), anything else (even "nope") "yes" (L20).
    """
    text = prediction.strip()
    if "." in text:  # eval_pope.py L12-13: keep the first sentence only
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")  # eval_pope.py L15-16
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"  # eval_pope.py L17-20


def mme_parse(prediction: str) -> str:
    """MME's reading of a free-form answer: "yes", "no" or "other", as the official ``eval_tool/calculation.py``
    does it (``parse_pred_ans``, L23-37 of the copy at TideDra/VL-RLHF@4c13000 ``eval/mme/calculation.py``).

    The answer is lower-cased (L119) and only its first four characters are searched: "yes" in them -> yes,
    else "no" in them -> no (so "Not sure" and "nope" are "no"), else "other" (L29-35; an exact "yes"/"no" is
    the same case, L26-27). The official result file carries the answer with its line's newline, which can never
    add a match, and LLaVA strips the output (model_vqa_loader.py L116): stripped here too. Unlike lmms-eval
    (``tasks/mme/utils.py`` L48-69) periods are not removed first and "y"/"n" are "other".
    """
    prefix = prediction.strip().lower()[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def ratio(num: float, den: float) -> float | None:
    """num/den, or None where the official script would divide by zero (it raises; no number is defined)."""
    return None if den == 0 else num / den


def pct(value: float | None) -> float | None:
    """A fraction as percent (the unit the papers report), None kept."""
    return None if value is None else 100.0 * value
