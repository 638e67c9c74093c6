"""The papers' table from a sweep over benchmark tasks: one row per method x kept tokens, one column per benchmark
in its own unit (each task's ``HEADLINE`` metric: POPE F1, MME perception, MMBench accuracy, ...), then TFLOPs per
item, the score relative to the unpruned row and $ per 1M items; and a plot of each benchmark against FLOPs.

The relative score of a setting is the mean over the benchmarks of its headline / the unpruned (``none``)
row's headline, in percent: the "Avg." / "relative" column of FastV, VisionZip, PruMerge+ and ACCM's tables.
The recommendation reads it as the accuracy when a sweep has benchmark columns (``with_relative_accuracy``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import tasks

PREFIX = "bench_"
BASELINE = "none"


def headline(task: str, metrics: Mapping[str, Any] | None) -> float:
    """A task's headline number from its aggregate (NaN when it is missing)."""
    key = tasks.get(task).HEADLINE
    value = (metrics or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def add_benchmark_columns(summary: pd.DataFrame, by_setting: Mapping[tuple[str, float], Mapping[str, Any]]
                          ) -> pd.DataFrame:
    """``summary`` (one row per setting) with ``bench_<task>`` headline columns and ``relative_score`` (%).

    ``by_setting``: (method, prune rate) -> that setting's summary.json ``benchmarks`` (task -> aggregate)."""
    out = summary.copy()
    benchmarks = [by_setting.get((m, float(r))) or {} for m, r in zip(out["method"], out["prune_rate"], strict=True)]
    names = sorted({t for b in benchmarks for t in b}, key=tasks.TASKS.index)
    if not names:
        return out
    for task in names:
        out[PREFIX + task] = [headline(task, b.get(task)) for b in benchmarks]
    base = out[out["method"] == BASELINE]
    if base.empty:
        out["relative_score"] = math.nan
        return out
    ref = {t: float(base.iloc[0][PREFIX + t]) for t in names}
    # a benchmark without a number (e.g. POPE's precision undefined: no "yes" at all) leaves the mean undefined
    out["relative_score"] = [
        _mean([100 * row[PREFIX + t] / ref[t] if ref[t] else math.nan for t in names]) for _, row in out.iterrows()
    ]
    return out


def _mean(values: list[float]) -> float:
    return math.nan if not values or any(math.isnan(v) for v in values) else sum(values) / len(values)


def benchmark_names(table: pd.DataFrame) -> list[str]:
    return [c[len(PREFIX):] for c in table.columns if c.startswith(PREFIX)]


def with_relative_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    """The table the recommendation reads: ``accuracy`` = the relative score (as a fraction) where a sweep
    has benchmark columns, so that ``--target-accuracy`` / ``--tolerance`` speak of the papers' relative score."""
    if "relative_score" not in table or table["relative_score"].isna().all():
        return table
    return table.assign(accuracy=table["relative_score"] / 100.0)


def per_task_recommendations(table: pd.DataFrame, *, tolerance_points: float, target_accuracy: float | None
                             ) -> list[str]:
    """The recommendation once per benchmark, on that benchmark's score relative to the unpruned row (so a
    tolerance or target speaks in relative percent for MME's perception score as for POPE's F1)."""
    from pipeline.report import recommend, recommendation_markdown

    base = table[table["method"] == BASELINE]
    lines = []
    for task in benchmark_names(table):
        ref = float(base.iloc[0][PREFIX + task]) if len(base) else math.nan
        if not ref or math.isnan(ref):
            lines.append(f"- **{task}**: no unpruned score to compare with.")
            continue
        rec = recommend(table.assign(accuracy=table[PREFIX + task] / ref), tolerance_points=tolerance_points,
                        target_accuracy=target_accuracy)
        text = recommendation_markdown(rec, tolerance_points=tolerance_points, target_accuracy=target_accuracy)
        lines.append(f"- **{task}** (relative to the unpruned {tasks.get(task).HEADLINE_UNIT} {ref:.1f}): "
                     + text.replace("accuracy", "relative score"))
    return lines


def paper_table_markdown(table: pd.DataFrame) -> str:
    """Rows method x kept tokens (the unpruned row first), columns the benchmarks in their units, TFLOPs/item,
    relative score and $ per 1M items (right-sized)."""
    from pipeline.report_tables import fmt_usd, markdown_table

    names = benchmark_names(table)
    header = ["method", "kept tokens", *(f"{t} ({tasks.get(t).HEADLINE_UNIT})" for t in names),
              "TFLOPs/item", "relative %", "$/1M items"]
    rows = []
    ordered = table.assign(_base=table["method"] != BASELINE).sort_values(
        ["_base", "keep_tokens"], ascending=[True, False], kind="stable")
    for _, r in ordered.iterrows():
        keep = r.get("keep_tokens")
        line = [str(r["method"]), "all" if keep is None or _isnan(keep) else str(int(keep))]
        line += [_num(r[PREFIX + t]) for t in names]
        line += [_num(r["flops_total"] / 1e12, 4), _num(r.get("relative_score")),
                 fmt_usd(r["usd_per_1m_rightsized"]) if "usd_per_1m_rightsized" in r else "n/a"]
        rows.append(line)
    return markdown_table(header, rows)


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _num(x: Any, digits: int = 1) -> str:
    if x is None or _isnan(x):
        return "-"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.3g}"


def plot_benchmarks_vs_flops(table: pd.DataFrame, path: Path) -> Path:
    """One panel per benchmark: its headline against TFLOPs per item, a line per method."""
    from pipeline.plots import _methods, _plt, _save, method_colour

    plt = _plt()
    names = benchmark_names(table)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, task in zip(axes[0], names, strict=True):
        for method in _methods(table):
            rows = table[table["method"] == method].sort_values("flops_total")
            ax.plot(rows["flops_total"] / 1e12, rows[PREFIX + task], marker="o", label=method,
                    color=method_colour(method))
        ax.set_title(task)
        ax.set_xlabel("TFLOPs per item")
        ax.set_ylabel(tasks.get(task).HEADLINE_UNIT)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)
