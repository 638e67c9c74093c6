"""The sweep report's Markdown tables and number formats (cost, accuracy, FLOPs per component).

Split from ``pipeline/report.py``, which builds the per-setting summary and writes the report; these
functions only format a summary table that already exists.
"""

from __future__ import annotations

import math

import pandas as pd

from pipeline.cost import ALL_COMPONENTS
from pipeline.plots import _nan


def fmt_usd(x: float) -> str:
    """Dollars with enough significant digits for tiny demo models and real ones alike."""
    if _nan(x):
        return "n/a"
    if x == 0 or abs(x) >= 100:
        return f"${x:,.0f}"
    if abs(x) >= 1:
        return f"${x:,.2f}"
    return f"${x:.3g}"


def fmt_flops(x: float) -> str:
    if _nan(x):
        return "n/a"
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return "0" if x == 0 else f"{x:.3g} FLOP"


def fmt_pct(x: float, digits: int = 1) -> str:
    return "n/a" if _nan(x) else f"{100 * x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cost_table_markdown(table: pd.DataFrame) -> str:
    """The cost table: one line per setting, FLOPs, GPU-seconds, $ per 1M items three ways."""
    has_acc = "accuracy" in table and table["accuracy"].notna().any()
    has_measured = "usd_per_1m_measured" in table and table["usd_per_1m_measured"].notna().any()
    header = ["method", "pruned", "kept tokens"]
    header += ["accuracy %"] if has_acc else []
    header += [
        "FLOPs/item",
        "saving vs ref",
        "LVLM:captioner GPUs",
        "bottleneck",
        "$/1M (cluster)",
        "$/1M (right-sized)",
    ]
    header += ["$/1M (measured)"] if has_measured else []
    rows = []
    for _, r in table.iterrows():
        keep = r.get("keep_tokens")
        line = [str(r["method"]), f"{100 * r['prune_rate']:.2f}%", "all" if _nan(keep) else str(int(keep))]
        line += [fmt_pct(r["accuracy"])] if has_acc else []
        ref = r.get("flops_reference_total")
        saving = 1 - r["flops_total"] / ref if ref and not _nan(ref) else math.nan
        line += [
            fmt_flops(r["flops_total"]),
            fmt_pct(saving, 0) + "%" if not _nan(saving) else "n/a",
            f"{r['balanced_gpu_ratio']:.3g}",
            str(r["bottleneck"]).replace("_tier", ""),
            fmt_usd(r["usd_per_1m_cluster"]),
            fmt_usd(r["usd_per_1m_rightsized"]),
        ]
        line += [fmt_usd(r["usd_per_1m_measured"])] if has_measured else []
        rows.append(line)
    return markdown_table(header, rows)


def accuracy_table_markdown(table: pd.DataFrame) -> str:
    qcols = sorted(c for c in table.columns if c.startswith("acc_"))
    header = ["method", "pruned", "items", "errors", "scored", "accuracy %"]
    header += [c.removeprefix("acc_") for c in qcols]
    header += ["items/s", "wall s"]
    rows = []
    for _, r in table.iterrows():
        rows.append(
            [
                str(r["method"]),
                f"{100 * r['prune_rate']:.2f}%",
                str(int(r.get("items", 0) or 0)),
                str(int(r.get("errors", 0) or 0)),
                "n/a" if _nan(r.get("scored")) else str(int(r["scored"])),
                fmt_pct(r["accuracy"]),
            ]
            + [fmt_pct(r[c]) for c in qcols]
            + [
                "n/a" if _nan(r.get("items_per_s")) else f"{r['items_per_s']:.1f}",
                "n/a" if _nan(r.get("wall_time_s")) else f"{r['wall_time_s']:.1f}",
            ]
        )
    return markdown_table(header, rows)


def flops_table_markdown(table: pd.DataFrame) -> str:
    comps = [c for c in ALL_COMPONENTS if f"flops_{c}" in table]
    header = ["method", "pruned"] + comps + ["total", "reference"]
    rows = []
    for _, r in table.iterrows():
        rows.append(
            [str(r["method"]), f"{100 * r['prune_rate']:.2f}%"]
            + [fmt_flops(r[f"flops_{c}"]) for c in comps]
            + [fmt_flops(r["flops_total"]), fmt_flops(r.get("flops_reference_total", math.nan))]
        )
    return markdown_table(header, rows)
