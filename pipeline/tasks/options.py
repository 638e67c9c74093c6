"""What the multiple-choice tasks share: the option layout LLaVA prompts with, the ``answers`` layout, accuracy.

``answers`` of a multiple-choice row is ``[correct letter, option text of A, option text of B, ...]``: the
letter is the ground truth; the option texts travel with it because some official rules match a prediction
against them (MMBench's ``can_infer_text``, ACCM's MMVP rule). A task with no option texts to hand keeps
just ``[letter]``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LETTERS = "ABCDE"  # eval_science_qa.py line 15 (ScienceQA has up to 5 choices); MMBench and SEED use A-D
_OPTION_LINE = re.compile(r"^([A-E])\. (.*)$")


def is_none(value: Any) -> bool:
    """LLaVA's ``is_none`` (model_vqa_mmbench.py lines 33-42): None, NaN, 'nan', 'none' (any case).

    '' counts too: LLaVA reads the TSV with ``pd.read_table`` (line 61), which turns an empty cell into NaN."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def option_lines(options: Sequence[str]) -> str:
    """'A. first\\nB. second...': LLaVA's option layout (model_vqa_mmbench.py lines 87-88, docs/Evaluation.md)."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def parse_option_lines(text: str) -> list[str]:
    """The option texts of a question that already carries 'A. ...' lines (LLaVA's SEED/ScienceQA files)."""
    found: dict[str, str] = {}
    for line in text.split("\n"):
        m = _OPTION_LINE.match(line.strip())
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2).strip()
    out = []
    for letter in LETTERS:  # contiguous from A
        if letter not in found:
            break
        out.append(found[letter])
    return out


def choice_answers(letter: str, options: Sequence[str]) -> tuple[list[str], str | None]:
    """(``answers``, ``input_error``): the answers layout, or an error when ``letter`` names no given option."""
    letter = (letter or "").strip().upper()
    answers = [letter, *[str(o) for o in options]]
    if options and letter not in LETTERS[: len(options)]:
        return answers, f"answer: unknown option letter {letter!r} (options {LETTERS[: len(options)]})"
    if not options and (len(letter) != 1 or letter not in LETTERS):
        return answers, f"answer: unknown option letter {letter!r}"
    return answers, None


def split_answers(answers: Sequence[str] | None) -> tuple[str, list[str]]:
    """(correct letter, option texts) of a multiple-choice ``answers`` list."""
    if not answers:
        return "", []
    return str(answers[0]).strip().upper(), [str(a) for a in answers[1:]]


def accuracy(scores: Iterable[float | None]) -> tuple[float | None, int]:
    """(percent correct, count) over the scored items (None scores skipped)."""
    vals = [float(s) for s in scores if s is not None]
    return (100.0 * sum(vals) / len(vals) if vals else None), len(vals)


def accuracy_by(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, float | None]:
    """Percent correct per value of ``rows[i][key]`` (the per-category tables of the official scripts)."""
    groups: dict[str, list[float | None]] = defaultdict(list)
    for row in rows:
        groups[str(row.get(key))].append(row.get("score"))
    return {k: accuracy(v)[0] for k, v in sorted(groups.items())}


def choice_aggregate(rows: Sequence[Mapping[str, Any]], *keys: str) -> dict[str, Any]:
    """Overall accuracy (percent) and one per-category table per ``keys`` (default: question_type)."""
    acc, n = accuracy(r.get("score") for r in rows)
    out: dict[str, Any] = {"accuracy": acc, "n": n}
    for key in keys or ("question_type",):
        out[f"accuracy_by_{key}"] = accuracy_by([r for r in rows if r.get("score") is not None], key)
    return out
