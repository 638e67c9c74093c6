"""Run summary: ``summary.json`` beside the output and a printed table.

Computed from per-shard statistics (``table_stats``, kept in each shard's ``_done/`` marker and merged), so
a resumed run reports the whole dataset without reading an output row back, while throughput counts only the
rows this run processed.

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

from pipeline.batching import padding_fraction
from pipeline.schema import FLOPS_COLUMNS, LATENCY_COLUMNS, PREFILL_COLUMNS


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


def table_stats(table: pa.Table) -> dict[str, Any]:
    """Mergeable statistics of output rows: what a summary needs, without the rows.

    The write path keeps one of these per finished shard (in its ``_done/`` marker), so a run's summary is
    the merge of its shards' stats and never reads the output files back (``pipeline.progress``)."""
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    error_col = cols.get("error", [None] * n)
    scores = cols.get("score", [None] * n)
    qtypes = cols.get("question_type", [None] * n)
    stats = empty_stats()
    stats["items"] = n
    for i in range(n):
        error, qt = error_col[i], qtypes[i] or ""
        per_type = stats["by_type"].setdefault(qt, [0, 0.0])
        if not _missing(error):
            stats["errors"] += 1
            kind = error.split(":", 1)[0]
            stats["error_kinds"][kind] = stats["error_kinds"].get(kind, 0) + 1
            continue
        if not _missing(scores[i]):
            stats["scored"] += 1
            stats["score_sum"] += float(scores[i])
            per_type[0] += 1
            per_type[1] += float(scores[i])
        for name in (*FLOPS_COLUMNS, *LATENCY_COLUMNS, *PREFILL_COLUMNS):
            value = cols.get(name, [None] * n)[i]
            if not _missing(value):
                acc = stats["means"].setdefault(name, [0.0, 0])
                acc[0] += float(value)
                acc[1] += 1
    stats["flops_total_sum"] = sum(v for v in cols.get("flops_total", []) if not _missing(v))
    for name in _MODE_COLUMNS:
        for v in cols.get(name, []):
            if v is not None:
                stats["values"].setdefault(name, {})
                stats["values"][name][str(v)] = stats["values"][name].get(str(v), 0) + 1
    return stats


_MODE_COLUMNS = ("keep_tokens", "visual_tokens_total", "method")


def empty_stats() -> dict[str, Any]:
    return {"items": 0, "errors": 0, "error_kinds": {}, "scored": 0, "score_sum": 0.0, "by_type": {},
            "means": {}, "flops_total_sum": 0.0, "values": {}}


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` + ``b`` (new dict; both as ``table_stats`` makes them or as read back from JSON)."""
    out = json.loads(json.dumps(a))
    for key in ("items", "errors", "scored", "score_sum", "flops_total_sum"):
        out[key] += b[key]
    for kind, count in b["error_kinds"].items():
        out["error_kinds"][kind] = out["error_kinds"].get(kind, 0) + count
    for qt, (scored, total) in b["by_type"].items():
        acc = out["by_type"].setdefault(qt, [0, 0.0])
        acc[0] += scored
        acc[1] += total
    for name, (total, count) in b["means"].items():
        acc = out["means"].setdefault(name, [0.0, 0])
        acc[0] += total
        acc[1] += count
    for name, counts in b["values"].items():
        mine = out["values"].setdefault(name, {})
        for value, count in counts.items():
            mine[value] = mine.get(value, 0) + count
    return out


def stats_mean(stats: dict[str, Any], name: str) -> float | None:
    """Mean of a FLOPs/latency column over rows without error (None if no row has it)."""
    total, count = stats["means"].get(name, (0.0, 0))
    return total / count if count else None


def stats_mode(stats: dict[str, Any], name: str) -> str | None:
    """The most common value of ``keep_tokens`` / ``visual_tokens_total`` / ``method`` (as text)."""
    counts = stats["values"].get(name) or {}
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def summarize(table: pa.Table, *, run: dict[str, Any]) -> dict[str, Any]:
    """Summary of an output table; ``run`` adds run facts (wall time, rows processed, config)."""
    return summarize_stats(table_stats(table), run=run)


def summarize_stats(stats: dict[str, Any], *, run: dict[str, Any]) -> dict[str, Any]:
    """Summary from merged per-shard stats (``table_stats``/``merge_stats``): summary.json's content."""
    per_type = {qt or "all": total / scored for qt, (scored, total) in sorted(stats["by_type"].items()) if scored}
    flops = {name: stats_mean(stats, name) for name in FLOPS_COLUMNS if name in stats["means"]}
    latency = {name: stats_mean(stats, name) for name in LATENCY_COLUMNS if name in stats["means"]}
    wall = run.get("wall_s") or 0.0
    processed = run.get("rows_processed", 0)
    return {
        **run,
        "items": stats["items"],
        "errors": stats["errors"],
        "error_kinds": stats["error_kinds"],
        # pipeline.summary.accuracy's definition: over rows with answers and no error
        "accuracy": stats["score_sum"] / stats["scored"] if stats["scored"] else None,
        "scored_items": stats["scored"],
        "accuracy_per_question_type": dict(sorted(per_type.items())),
        "flops_mean_per_item": flops,
        "flops_saving": (1 - flops["flops_total"] / flops["flops_reference_total"])
        if flops.get("flops_total") and flops.get("flops_reference_total") else None,
        "flops_total": stats["flops_total_sum"],
        "latency_mean_s": latency,
        # share of the LLM prefill's positions that were left padding (length buckets keep it small)
        "padding_fraction": padding_fraction(stats_mean(stats, "prefill_tokens"),
                                             stats_mean(stats, "prefill_pad_tokens")),
        "items_per_s": processed / wall if wall > 0 else None,
        "stats": stats,
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
        f"{'LLM prefill padding':<28}{_fmt(s.get('padding_fraction'))}  (share of prefill positions; length buckets)",
    ]
    for task, metrics in (s.get("benchmarks") or {}).items():
        lines.append(f"{task + ' (official metrics)':<28}")
        lines += [f"{'  ' + k:<28}{_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float))]
    for task, url in (s.get("exports") or {}).items():
        lines.append(f"{task + ' answers (LLaVA)':<28}{url}")
    if s.get("retries"):
        counts = ", ".join(f"{op} {n}" for op, n in sorted(s["retries"].items()))
        lines.append(f"{'object-store retries':<28}{sum(s['retries'].values())}  ({counts})")
    return "\n".join(lines)


def to_json(s: dict[str, Any]) -> bytes:
    return json.dumps(s, indent=2, sort_keys=False, default=str).encode()
