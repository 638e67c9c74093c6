"""Run summary: ``summary.json`` beside the output and a printed table.

Computed from the output files themselves (all shards of the input, resumed ones included), so a
resumed run reports the whole dataset, while throughput counts only the rows this run processed.

``accuracy`` is the project's one accuracy definition (mean score over rows with ground-truth answers and
no error; errored and scored row counts beside it): ``summarize`` and the sweep's ``pipeline.report``
both call it, so a setting's summary.json and its line in the sweep summary agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.schema import FLOPS_COLUMNS, LATENCY_COLUMNS


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass(frozen=True)
class Accuracy:
    accuracy: float | None  # None when no row is scored
    scored: int  # rows with ground-truth answers and no error: the ones the accuracy is over
    errors: int  # rows with an error: counted here, not scored


def accuracy(scores: Iterable[float | None], errors: Iterable[str | None]) -> Accuracy:
    """The one accuracy definition of the project (the main job's ``summary.json`` and the sweep's
    summary Parquet / report both use it): the mean VQA ``score`` over rows that have ground-truth answers
    and no error. Errored rows are reported beside it, not counted as wrong; rows without answers have no
    score (``pipeline.stages.score_batch``) and are not counted either."""
    n_err, values = 0, []
    for score, error in zip(scores, errors, strict=True):
        if not _missing(error):
            n_err += 1
        elif not _missing(score):
            values.append(float(score))
    return Accuracy(sum(values) / len(values) if values else None, len(values), n_err)


def summarize(table: pa.Table, *, run: dict[str, Any]) -> dict[str, Any]:
    """Summary of an output table; ``run`` adds run facts (wall time, rows processed, config)."""
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    error_col = cols.get("error", [None] * n)
    errors = [e for e in error_col if e is not None]
    ok = [i for i in range(n) if error_col[i] is None]
    scores = cols.get("score", [None] * n)
    qtypes = cols.get("question_type", [None] * n)
    acc = accuracy(scores, error_col)
    by_type: dict[str, list[int]] = {}
    for i in range(n):
        by_type.setdefault(qtypes[i] or "all", []).append(i)
    per_type = {qt: accuracy([scores[i] for i in idx], [error_col[i] for i in idx]) for qt, idx in by_type.items()}
    flops = {name: _mean([cols[name][i] for i in ok]) for name in FLOPS_COLUMNS if name in cols}
    total_flops = sum(v for v in (cols.get("flops_total") or []) if v is not None)
    latency = {name: _mean([cols[name][i] for i in ok]) for name in LATENCY_COLUMNS if name in cols}
    error_kinds: dict[str, int] = {}
    for e in errors:
        key = e.split(":", 1)[0]
        error_kinds[key] = error_kinds.get(key, 0) + 1
    wall = run.get("wall_s") or 0.0
    processed = run.get("rows_processed", 0)
    return {
        **run,
        "items": n,
        "errors": acc.errors,
        "error_kinds": error_kinds,
        "accuracy": acc.accuracy,  # pipeline.summary.accuracy: over rows with answers and no error
        "scored_items": acc.scored,
        "accuracy_per_question_type": {k: v.accuracy for k, v in sorted(per_type.items()) if v.scored},
        "flops_mean_per_item": flops,
        "flops_saving": (1 - flops["flops_total"] / flops["flops_reference_total"])
        if flops.get("flops_total") and flops.get("flops_reference_total") else None,
        "flops_total": total_flops,
        "latency_mean_s": latency,
        "items_per_s": processed / wall if wall > 0 else None,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def format_table(s: dict[str, Any]) -> str:
    """The summary as a short human-readable table."""
    lines = [
        f"run {s.get('run_id')}  method={s.get('method')}  keep_tokens={s.get('keep_tokens')}  "
        f"output={s.get('output')}",
        f"{'items':<28}{s['items']}",
        f"{'errors':<28}{s['errors']}  {s['error_kinds'] or ''}",
        f"{'accuracy':<28}{_fmt(s['accuracy'])}  (scored {s['scored_items']}: rows with answers, no error)",
    ]
    for qt, acc in s["accuracy_per_question_type"].items():
        lines.append(f"{'  ' + qt:<28}{_fmt(acc)}")
    lines.append("mean FLOPs per item")
    for name, v in s["flops_mean_per_item"].items():
        lines.append(f"{'  ' + name.removeprefix('flops_'):<28}{_fmt(v)}")
    lines += [
        f"{'FLOPs saving vs reference':<28}{_fmt(s['flops_saving'])}",
        f"{'total FLOPs':<28}{_fmt(s['flops_total'])}",
        f"{'rows processed this run':<28}{s.get('rows_processed')}  (shards skipped: {s.get('shards_skipped')})",
        f"{'wall time (s)':<28}{_fmt(s.get('wall_s'))}",
        f"{'items/s':<28}{_fmt(s['items_per_s'])}",
    ]
    return "\n".join(lines)


def to_json(s: dict[str, Any]) -> bytes:
    return json.dumps(s, indent=2, sort_keys=False, default=str).encode()
