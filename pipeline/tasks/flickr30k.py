"""Flickr30k captioning: corpus CIDEr (pycocoevalcap, PTB-tokenized), as ACCM and lmms-eval compute it.

ACCM (ASGO-MM/ACCM 93e1ca2) runs ``llava/eval/model_vqa_caption.py`` on its own ``questions-3k.jsonl``
(``scripts/v1_5/eval/flickr.sh``; each line's ``text`` is the prompt) and scores with
``scripts/eval_flickr.py``: PTBTokenizer on references and candidates (lines 23-24), then ``Cider`` (line 30),
references paired with answers by line order (lines 46-63). lmms-eval (75571cfe,
``lmms_eval/tasks/flickr30k/utils.py``) does the same over lmms-lab/flickr30k's five captions per image
(lines 53-82) with the prompt of line 22. CIDEr is a corpus score: ``score`` is None per item.

Tokenizer: pycocoevalcap's PTBTokenizer runs Stanford's Java tokenizer. Without java (or when it fails) a
Python stand-in (``ptb_like``) is used instead and ``aggregate`` says which one ran.
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pyarrow as pa

from pipeline.tasks.common import Reader, image_bytes

NAME = "flickr30k"
FORMATS = ("hf-parquet", "llava-jsonl")
MAX_NEW_TOKENS = 128  # ACCM model_vqa_caption.py line 97 (max_new_tokens=128)
HEADLINE = "cider_x100"  # the number the papers' tables show (pipeline/benchmark_table.py)
HEADLINE_UNIT = "CIDEr"
PROMPT = "Provide a one-sentence caption for the provided image."  # lmms-eval flickr30k/utils.py line 22
EXTRA_FIELDS = pa.schema([pa.field("img_id", pa.string()), pa.field("filename", pa.string())])
# pycocoevalcap tokenizer/ptbtokenizer.py: the tokens it drops after tokenizing with -lowerCase. '-LRB-' and
# friends are upper-case there, so the lower-cased '-lrb-' it gets back is kept: a quirk kept here too.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])  # fmt: skip
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ", "]": " -rsb- "}
_TOKEN = re.compile(r"-l[rcs]b-|-r[rcs]b-|n't|'[a-z]+|\.\.\.|--|\w+(?:[-./]\w+)*|[^\w\s]")


def load_truth(annotations: str | None, read: Reader) -> dict | None:
    """ACCM's ``annotations-3k.jsonl`` (one ``{'text': ...}`` per question line) -> references by
    question_id where the lines carry one, else by line number. None for ``hf-parquet`` (rows carry captions)."""
    if annotations is None:
        return None
    by_id: dict[str, list[str]] = {}
    by_pos: list[list[str]] = []
    for line in read(annotations).decode().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        text = item.get("text", item.get("caption"))
        refs = [str(t) for t in text] if isinstance(text, list) else [str(text)]
        by_pos.append(refs)
        if item.get("question_id") is not None:
            by_id[str(item["question_id"])] = refs
    return {"by_id": by_id, "by_pos": by_pos}


def to_row(record: dict, fmt: str, truth: Any, index: int) -> dict:
    """An lmms-lab/flickr30k row (image, caption[5], img_id, filename) or a line of ACCM's questions file.

    For ``llava-jsonl`` without question ids in the annotations, ``index`` must be the line number in the
    question file (ACCM pairs the two files line by line)."""
    if fmt == "hf-parquet":
        img_id = str(record.get("img_id", index))
        row: dict[str, Any] = {
            "id": img_id,
            "question": PROMPT,
            "answers": [str(c) for c in record.get("caption") or []] or None,
            "question_type": None,
            "image": image_bytes(record.get("image")),
            "img_id": img_id,
            "filename": record.get("filename"),
        }
        if row["image"] is None:
            row["input_error"] = "image: missing"
        return row
    if fmt == "llava-jsonl":
        if truth is None:
            raise ValueError(f"--task {NAME} --format llava-jsonl needs --annotations: annotations-3k.jsonl")
        qid = str(record["question_id"])
        refs = truth["by_id"].get(qid)
        if refs is None and not truth["by_id"] and 0 <= index < len(truth["by_pos"]):
            refs = truth["by_pos"][index]
        image = str(record["image"])
        return {
            "id": qid,
            "question": str(record["text"]).strip(),  # model_vqa_caption.py line 58: the file's text as is
            "answers": refs,
            "question_type": None,
            "image_file": image,
            "img_id": image.rsplit("/", 1)[-1].rsplit(".", 1)[0],
            "filename": image,
        }
    raise ValueError(f"--task {NAME} reads {', '.join(FORMATS)}, not {fmt!r}")


def score(prediction: str, answers: list[str]) -> None:
    """None: CIDEr weighs n-grams by document frequency over the whole set, so an item has no score alone."""
    return None


def ptb_like(text: str) -> str:
    """A Python stand-in for PTBTokenizer -preserveLines -lowerCase followed by pycocoevalcap's punctuation
    filter: lower-case, brackets as -lrb-/-rrb-, clitics split ("n't", "'s"), punctuation tokens dropped."""
    t = text.replace("\n", " ").lower()
    for bracket, token in _BRACKETS.items():
        t = t.replace(bracket, token)
    t = re.sub(r"(\w)n't\b", r"\1 n't", t)
    t = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", t)
    t = t.replace('"', " '' ")
    return " ".join(w for w in _TOKEN.findall(t) if w not in PTB_PUNCTUATION)


def _tokenize(gts: dict, res: dict) -> tuple[dict, dict, str]:
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        if shutil.which("java") is None:  # PTBTokenizer would leave its temp file behind in its package
            raise FileNotFoundError("java")

        tok = PTBTokenizer()
        g, r = tok.tokenize(gts), tok.tokenize(res)
        if set(g) == set(gts) and all(len(g[k]) == len(gts[k]) for k in gts) and set(r) == set(res):
            return g, r, "ptb"
    except Exception:  # java missing, unwritable package folder: the stand-in below
        pass
    g = {k: [ptb_like(c["caption"]) for c in v] for k, v in gts.items()}
    r = {k: [ptb_like(c["caption"]) for c in v] for k, v in res.items()}
    return g, r, "python-ptb-like"


def aggregate(rows: list[dict], tokenizer: str = "auto") -> dict:
    """Corpus CIDEr (pycocoevalcap ``Cider``: CIDEr-D, n=4, sigma=6) over the rows with references.

    ``cider`` is pycocoevalcap's value as eval_flickr.py prints it; papers quote ``cider_x100``."""
    from pycocoevalcap.cider.cider import Cider

    items = [r for r in rows if r.get("answers")]
    if not items:
        return {"cider": None, "cider_x100": None, "n": 0, "tokenizer": None}
    gts = {str(r["id"]): [{"caption": str(a)} for a in r["answers"]] for r in items}
    res = {str(r["id"]): [{"caption": str(r.get("prediction") or "")}] for r in items}
    if tokenizer == "python":
        g = {k: [ptb_like(c["caption"]) for c in v] for k, v in gts.items()}
        t = {k: [ptb_like(c["caption"]) for c in v] for k, v in res.items()}
        used = "python-ptb-like"
    else:
        g, t, used = _tokenize(gts, res)
    cider, _ = Cider().compute_score(g, t)
    return {"cider": float(cider), "cider_x100": 100.0 * float(cider), "n": len(items), "tokenizer": used}
