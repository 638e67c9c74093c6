"""Accuracy-vs-cost report of a sweep: per-setting summary, plots, $ per 1M items, a recommendation.

Input is the *per-setting summary*: a pandas DataFrame (or its Parquet) with one row per
(method, prune_rate) — accuracy overall and per question type, mean FLOPs per item by component,
measured items/s and wall time. ``summarize_rows`` / ``build_summary`` make it from the job's per-row
output; ``write_report`` turns it into ``report.md`` plus PNG plots (matplotlib, Agg backend) beside it.

Accuracy is a fraction in [0, 1] in the data and printed in percent; tolerances are in points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.benchmark_table import (
    benchmark_names,
    paper_table_markdown,
    per_task_recommendations,
    plot_benchmarks_vs_flops,
    with_relative_accuracy,
)
from pipeline.cost import ALL_COMPONENTS, CostConfig, cost_columns
from pipeline.plots import (
    BASELINE_METHOD,
    _nan,
    plot_accuracy_vs_flops,
    plot_accuracy_vs_rate,
    plot_cost,
    plot_flops_components,
    plot_throughput,
)
from pipeline.report_tables import (
    accuracy_table_markdown,
    cost_table_markdown,
    flops_table_markdown,
    fmt_usd,
)

SETTING_KEYS = ("method", "prune_rate")
FLOPS_SUMMARY = tuple(f"flops_{c}" for c in ALL_COMPONENTS) + ("flops_total", "flops_reference_total")


# ----------------------------------------------------------------------------------------------------
# per-setting summary


def rate_label(rate: float) -> str:
    """The directory name of a pruning rate: ``0.875`` -> ``"0.875"``, ``0`` -> ``"0"``."""
    return f"{float(rate):g}"


def summarize_rows(
    rows: pd.DataFrame,
    *,
    method: str | None = None,
    prune_rate: float | None = None,
    wall_time_s: float | None = None,
) -> dict[str, Any]:
    """One setting's summary row from its per-row output (the columns of ``pipeline.schema``).

    Accuracy is ``pipeline.summary.accuracy`` (the main job's summary.json uses the same function): the
    mean ``score`` over rows with ground-truth answers and no error; ``errors`` and ``scored`` count the
    rows beside it. The pruning rate defaults to ``1 - keep_tokens / visual_tokens_total``.
    """
    from pipeline.summary import accuracy

    n = len(rows)
    err = rows["error"].notna() if "error" in rows else pd.Series(False, index=rows.index)
    errors = rows["error"] if "error" in rows else pd.Series(None, index=rows.index, dtype=object)
    score = rows["score"].astype("float64") if "score" in rows else pd.Series(math.nan, index=rows.index)
    acc = accuracy(score.tolist(), errors.tolist())
    out: dict[str, Any] = {
        "method": method if method is not None else _mode(rows.get("method")),
        "items": n,
        "errors": acc.errors,
        "scored": acc.scored,
        "accuracy": acc.accuracy if acc.accuracy is not None else math.nan,
    }
    keep, total = _mode(rows.get("keep_tokens")), _mode(rows.get("visual_tokens_total"))
    out["keep_tokens"] = keep
    out["visual_tokens_total"] = total
    if prune_rate is None:
        prune_rate = 1.0 - keep / total if keep is not None and total else math.nan
    out["prune_rate"] = float(prune_rate)
    if "question_type" in rows:
        for qtype, idx in rows.groupby(rows["question_type"].fillna("unknown")).groups.items():
            a = accuracy(score[idx].tolist(), errors[idx].tolist()).accuracy
            out[f"acc_{qtype}"] = a if a is not None else math.nan
    ok = ~err
    for col in FLOPS_SUMMARY:
        if col in rows:
            vals = rows.loc[ok, col].astype("float64")
            out[col] = float(vals.mean()) if vals.notna().any() else math.nan
    for col in rows.columns:
        if col.startswith("latency_"):
            out[f"mean_{col}"] = float(rows[col].astype("float64").mean())
    out["wall_time_s"] = float(wall_time_s) if wall_time_s is not None else math.nan
    out["items_per_s"] = n / wall_time_s if wall_time_s else math.nan
    return out


def _mode(col: pd.Series | None) -> Any:
    if col is None:
        return None
    col = col.dropna()
    if col.empty:
        return None
    v = col.mode().iloc[0]
    return v.item() if hasattr(v, "item") else v


def build_summary(settings: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The combined summary from settings given as dicts with ``rows`` (per-row DataFrame) and
    optionally ``method``, ``prune_rate``, ``wall_time_s`` and any extra columns (copied as they are).
    Sorted by method, then pruning rate."""
    records = []
    for s in settings:
        extra = {k: v for k, v in s.items() if k not in ("rows", "method", "prune_rate", "wall_time_s")}
        rec = summarize_rows(
            s["rows"],
            method=s.get("method"),
            prune_rate=s.get("prune_rate"),
            wall_time_s=s.get("wall_time_s"),
        )
        rec.update(extra)
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    return sort_settings(df)


def sort_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Full tokens first, then the methods in first-seen order, each by pruning rate."""
    if not len(df):
        return df
    order = {m: i for i, m in enumerate(dict.fromkeys([BASELINE_METHOD, *df["method"]]))}
    key = df["method"].map(order)
    return (
        df.assign(_k=key)
        .sort_values(["_k", "prune_rate"], kind="stable")
        .drop(columns="_k")
        .reset_index(drop=True)
    )


def summarize_stats_row(stats: Mapping[str, Any], *, method: str, prune_rate: float,
                        wall_time_s: float | None = None) -> dict[str, Any]:
    """``summarize_rows``'s record from a setting's merged shard statistics (``pipeline.summary.table_stats``,
    kept in its ``summary.json``): the sweep's summary without reading an output row back."""
    from pipeline.summary import stats_mean, stats_mode

    keep, total = stats_mode(stats, "keep_tokens"), stats_mode(stats, "visual_tokens_total")
    keep, total = (int(keep) if keep is not None else None), (int(total) if total is not None else None)
    out: dict[str, Any] = {
        "method": method,
        "items": stats["items"],
        "errors": stats["errors"],
        "scored": stats["scored"],
        "accuracy": stats["score_sum"] / stats["scored"] if stats["scored"] else math.nan,
        "keep_tokens": keep,
        "visual_tokens_total": total,
        "prune_rate": float(prune_rate),
    }
    for qtype, (scored, score_sum) in sorted(stats["by_type"].items()):
        out[f"acc_{qtype or 'unknown'}"] = score_sum / scored if scored else math.nan
    for col in FLOPS_SUMMARY:
        if col in stats["means"]:
            mean = stats_mean(stats, col)
            out[col] = mean if mean is not None else math.nan
    for col, _ in sorted(stats["means"].items()):
        if col.startswith("latency_"):
            out[f"mean_{col}"] = stats_mean(stats, col)
    out["wall_time_s"] = float(wall_time_s) if wall_time_s is not None else math.nan
    out["items_per_s"] = stats["items"] / wall_time_s if wall_time_s else math.nan
    return out


def summary_from_stats(settings: Iterable[tuple[str, float, Mapping[str, Any], float | None]]) -> pd.DataFrame:
    """The sweep's combined summary from ``(method, rate, stats, wall time)`` per setting, sorted."""
    records = [summarize_stats_row(stats, method=m, prune_rate=r, wall_time_s=w) for m, r, stats, w in settings]
    return sort_settings(pd.DataFrame.from_records(records))


ESTIMATE_MODELS = ("llava-1.5-7b", "llava-1.5-13b")
ESTIMATE_KEEPS = (192, 128, 64, 36, 18)
ESTIMATE_METHODS = ("none", "fastv", "visionzip", "prumerge_plus", "accm")


def estimate_summary(
    model: str = "llava-1.5-7b",
    *,
    keeps: Iterable[int] = ESTIMATE_KEEPS,
    methods: Iterable[str] = ESTIMATE_METHODS,
    prompt_tokens: int = 64,
    new_tokens: int = 4,
    caption_tokens: int = 36,
) -> pd.DataFrame:
    """A FLOPs-only summary for a real model, from ``pipeline.flops`` alone (no weights, no Ray).

    ``model`` is ``llava-1.5-7b``, ``llava-1.5-13b`` or a checkpoint directory with a config. ``accm``
    uses the paper's captioner (ClipCap mapper + GPT-2 small, 3 beams) and selector (LongCLIP-L + a
    4-layer encoder) with a ``caption_tokens`` caption; ``prompt_tokens`` / ``new_tokens`` are the
    text around the image and the answer length. Accuracy is unknown (NaN).
    """
    from pipeline import flops, flops_cli

    config = flops_cli.load_llava_config(model)
    total = flops.visual_tokens(config)
    records = []
    for method in methods:
        for keep in [total] if method == BASELINE_METHOD else list(keeps):
            item = flops_cli.cli_item(
                config,
                method=method,
                keep=keep,
                prompt_tokens=prompt_tokens,
                new_tokens=new_tokens,
                caption_tokens=caption_tokens if method == "accm" else None,
                text_guide_dims=flops_cli.default_text_guide_dims(model),
            )
            rec: dict[str, Any] = {
                "method": method,
                "prune_rate": 1.0 - keep / total,
                "keep_tokens": keep,
                "visual_tokens_total": total,
                "accuracy": math.nan,
            }
            for c in (*ALL_COMPONENTS, "total", "reference_total"):
                rec[f"flops_{c}"] = float(item.get(c, 0.0))
            records.append(rec)
    return sort_settings(pd.DataFrame.from_records(records))


# ----------------------------------------------------------------------------------------------------
# recommendation


@dataclass(frozen=True)
class Recommendation:
    method: str
    prune_rate: float
    accuracy: float
    usd_per_1m: float
    baseline_accuracy: float
    baseline_usd_per_1m: float
    threshold: float  # the accuracy a setting had to reach

    @property
    def saving(self) -> float:
        """Fraction of the full-token price saved."""
        return 1.0 - self.usd_per_1m / self.baseline_usd_per_1m if self.baseline_usd_per_1m else math.nan


def recommend(
    table: pd.DataFrame,
    *,
    tolerance_points: float = 2.0,
    target_accuracy: float | None = None,
    price_column: str = "usd_per_1m_rightsized",
) -> Recommendation | None:
    """The cheapest setting whose accuracy is at least the threshold, or ``None`` if none is.

    Threshold = ``target_accuracy`` (percent) when given, else the full-token (``method == "none"``)
    accuracy minus ``tolerance_points``. Ties on price go to the higher accuracy. The default price is
    the right-sized one: a fixed cluster prices every setting at its bottleneck tier's pace, so
    settings that only lighten the other tier would tie; choosing a setting means sizing the tiers
    for it (the report gives the LVLM-to-captioner GPU ratio).
    """
    base = table[table["method"] == BASELINE_METHOD]
    base_acc = float(base["accuracy"].max()) if len(base) else math.nan
    base_usd = float(base[price_column].min()) if len(base) else math.nan
    if target_accuracy is not None:
        threshold = target_accuracy / 100.0
    elif not math.isnan(base_acc):
        threshold = base_acc - tolerance_points / 100.0
    else:
        return None
    ok = table[table["accuracy"].notna() & (table["accuracy"] >= threshold - 1e-12)]
    if ok.empty:
        return None
    best = ok.sort_values([price_column, "accuracy"], ascending=[True, False]).iloc[0]
    return Recommendation(
        str(best["method"]),
        float(best["prune_rate"]),
        float(best["accuracy"]),
        float(best[price_column]),
        base_acc,
        base_usd,
        threshold,
    )


# ----------------------------------------------------------------------------------------------------
# markdown (the tables and number formats: pipeline/report_tables.py)


def recommendation_markdown(
    rec: Recommendation | None, *, tolerance_points: float, target_accuracy: float | None
) -> str:
    rule = (
        f"accuracy >= {target_accuracy:.1f}%"
        if target_accuracy is not None
        else f"accuracy within {tolerance_points:g} points of full tokens"
    )
    if rec is None:
        return f"No setting meets the target ({rule})."
    if rec.method == BASELINE_METHOD:
        return (
            f"Target: {rule} (>= {100 * rec.threshold:.1f}%). No pruned setting meets it: keep all tokens "
            f"(`none`, {100 * rec.accuracy:.1f}%, {fmt_usd(rec.usd_per_1m)} per 1M items)."
        )
    base = (
        f" Full tokens: {100 * rec.baseline_accuracy:.1f}% at {fmt_usd(rec.baseline_usd_per_1m)} per 1M items; "
        f"saving {100 * rec.saving:.0f}% ({fmt_usd(rec.baseline_usd_per_1m - rec.usd_per_1m)} per 1M items)."
        if not _nan(rec.baseline_usd_per_1m)
        else ""
    )
    return (
        f"Target: {rule} (>= {100 * rec.threshold:.1f}%). **Cheapest setting that meets it: `{rec.method}` at "
        f"{100 * rec.prune_rate:.2f}% pruning** — accuracy {100 * rec.accuracy:.1f}%, "
        f"{fmt_usd(rec.usd_per_1m)} per 1M items with tiers sized to the work.{base}"
    )


def write_report(
    summary: pd.DataFrame,
    out_dir: str | Path,
    *,
    config: CostConfig | None = None,
    tolerance_points: float = 2.0,
    target_accuracy: float | None = None,
    measured_usd_per_hour: float | None = None,
    title: str = "Pruning-rate sweep: accuracy vs cluster cost",
    notes: Iterable[str] = (),
) -> Path:
    """Write ``report.md``, the PNG plots and ``cost_table.csv`` into ``out_dir`` (a local directory).

    Returns the path of ``report.md``. Settings without accuracy (estimate mode) get the FLOPs and
    cost parts only.
    """
    config = config or CostConfig.default()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = cost_columns(summary, config, measured_usd_per_hour=measured_usd_per_hour)
    table.to_csv(out / "cost_table.csv", index=False)
    has_acc = "accuracy" in table and table["accuracy"].notna().any()

    plots: list[tuple[str, Path]] = []
    if has_acc:
        plots.append(
            (
                "Accuracy vs FLOPs per item (trade-off curve)",
                plot_accuracy_vs_flops(table, out / "accuracy_vs_flops.png"),
            )
        )
        plots.append(
            ("Accuracy vs pruning rate", plot_accuracy_vs_rate(table, out / "accuracy_vs_prune_rate.png"))
        )
    plots.append(("FLOPs per item by component", plot_flops_components(table, out / "flops_components.png")))
    plots.append(("Throughput", plot_throughput(table, out / "throughput.png")))
    plots.append(("$ per 1M items vs pruning rate", plot_cost(table, out / "cost_vs_prune_rate.png")))

    md = [f"# {title}", ""]
    md += [f"- {n}" for n in notes]
    md += ["", "## Recommendation", ""]
    benchmarks = benchmark_names(table)
    if benchmarks:
        plots.insert(0, ("Each benchmark vs FLOPs per item", plot_benchmarks_vs_flops(table, out / "benchmarks.png")))
    if has_acc:
        rec = recommend(with_relative_accuracy(table), tolerance_points=tolerance_points,
                        target_accuracy=target_accuracy)
        md.append(
            recommendation_markdown(rec, tolerance_points=tolerance_points, target_accuracy=target_accuracy)
        )
        if benchmarks:
            md += ["", "Per benchmark (its score relative to the unpruned row's; the line above reads the mean "
                   "relative score over the benchmarks):", ""]
            md += per_task_recommendations(table, tolerance_points=tolerance_points, target_accuracy=target_accuracy)
    else:
        md.append("No accuracy in this report (FLOPs-only estimate): pick a rate from measured accuracy.")
    if benchmarks:
        md += ["", "## Benchmarks (the papers' table)", "",
               "Each benchmark's official metric in its own unit (pipeline/tasks); *relative %*: the mean over the "
               "benchmarks of each score / the unpruned row's, which the recommendation reads as accuracy.", "",
               paper_table_markdown(table)]
    md += ["", "## Cost per 1M items", "", config.describe(), ""]
    md += [
        "*cluster*: the configured cluster paced by its bottleneck tier, all its GPUs paid for; "
        "*right-sized*: each tier scaled to its work (lower bound; the recommendation uses it); "
        "*LVLM:captioner GPUs*: the tier ratio that keeps both tiers busy for that setting; "
        "*measured*: this run's items/s times the price of the cluster it ran on (only for GPU runs). "
        "FLOPs-based prices ignore data loading, batching and framework overheads: for small models they "
        "are far below what a real run costs.",
        "",
        cost_table_markdown(table),
        "",
    ]
    if has_acc:
        md += [
            "## Accuracy",
            "",
            "Accuracy: mean VQA score over the rows that have ground-truth answers and no error (*scored*); "
            "rows with an error are counted under *errors* and left out, as in the main job's summary.json "
            "(one definition: `pipeline.summary.accuracy`).",
            "",
            accuracy_table_markdown(table),
            "",
        ]
    md += ["## FLOPs per item (mean, by component)", "", flops_table_markdown(table), ""]
    md += ["## Plots", ""]
    md += [f"![{name}]({p.name})" for name, p in plots]
    md.append("")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
