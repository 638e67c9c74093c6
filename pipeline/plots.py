"""The sweep report's plots (PNG, matplotlib's Agg backend): accuracy vs FLOPs and vs pruning rate, FLOPs by
component, throughput and $ per 1M items, one line per method."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.cost import ALL_COMPONENTS

BASELINE_METHOD = "none"  # the unpruned setting (the report and the recommendation use it too)


def _nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return x is None




def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["method"]))


def method_colour(method: str) -> str:
    """One colour per method in every plot (tab10 by its place in the one list of methods)."""
    from pipeline.config import METHODS

    i = METHODS.index(method) if method in METHODS else len(METHODS) + sum(map(ord, method))
    return f"C{i % 10}"


def plot_accuracy_vs_flops(table: pd.DataFrame, path: Path) -> Path:
    """The paper's trade-off curve: accuracy against total FLOPs per item, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in _methods(table):
        t = table[table["method"] == m].sort_values("flops_total")
        ax.plot(t["flops_total"] / 1e9, 100 * t["accuracy"], marker="o", label=m, color=method_colour(m))
    ax.set_xlabel("GFLOPs per item (total)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs compute")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_accuracy_vs_rate(table: pd.DataFrame, path: Path) -> Path:
    """Accuracy against the pruning rate; the full-token accuracy as a horizontal line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = table[table["method"] == BASELINE_METHOD]
    for m in _methods(table):
        if m == BASELINE_METHOD:
            continue
        t = table[table["method"] == m].sort_values("prune_rate")
        ax.plot(100 * t["prune_rate"], 100 * t["accuracy"], marker="o", label=m, color=method_colour(m))
    if len(base):
        ax.axhline(100 * base["accuracy"].max(), color="k", ls="--", lw=1, label="none (all tokens)")
    ax.set_xlabel("visual tokens pruned (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs pruning rate")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_flops_components(table: pd.DataFrame, path: Path) -> Path:
    """Stacked mean FLOPs per item by component, one bar per setting."""
    plt = _plt()
    labels = [_label(r) for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(labels) + 2), 4.6))
    bottom = [0.0] * len(table)
    parts = list(ALL_COMPONENTS)
    zero = pd.Series(0.0, index=table.index)
    named = sum(table.get(f"flops_{c}", zero).fillna(0) for c in parts)
    other = (table["flops_total"].fillna(0) - named).clip(lower=0)
    for comp in parts + ["other"]:
        vals = (
            other
            if comp == "other"
            else table.get(f"flops_{comp}", pd.Series(0.0, index=table.index)).fillna(0)
        )
        if float(vals.sum()) <= 1e-9 * float(table["flops_total"].fillna(0).sum()):  # rounding is not a part
            continue
        label = "other" if comp == "other" else comp
        ax.bar(labels, vals / 1e9, bottom=bottom, label=label)
        bottom = [b + v / 1e9 for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("GFLOPs per item")
    ax.set_title("FLOPs per item by component")
    ax.tick_params(axis="x", labelrotation=60)
    _legend(ax)
    return _save(fig, path)


def plot_throughput(table: pd.DataFrame, path: Path) -> Path:
    """Measured items/s per setting (and the configured cluster's FLOPs-based items/s, if known)."""
    plt = _plt()
    labels = [_label(r) for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(labels) + 2), 4.4))
    measured = table.get("items_per_s")
    if measured is not None and measured.notna().any():
        ax.bar(labels, measured.fillna(0))
        ax.set_ylabel("items/s (measured, this run)")
        ax.set_title("Measured throughput")
    else:
        ax.bar(labels, table["cluster_items_per_s"])
        ax.set_ylabel("items/s (FLOPs model, configured cluster)")
        ax.set_title("Modelled cluster throughput")
    ax.tick_params(axis="x", labelrotation=60)
    return _save(fig, path)


def plot_cost(table: pd.DataFrame, path: Path) -> Path:
    """$ per 1M items (tiers sized to the work) against the pruning rate, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in _methods(table):
        t = table[table["method"] == m].sort_values("prune_rate")
        ax.plot(100 * t["prune_rate"], t["usd_per_1m_rightsized"], marker="o", label=m, color=method_colour(m))
    ax.set_xlabel("visual tokens pruned (%)")
    ax.set_ylabel("$ per 1M items (right-sized tiers)")
    ax.set_title("Cost vs pruning rate")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _label(row: Mapping[str, Any]) -> str:
    if row["method"] == BASELINE_METHOD:
        return "none"
    keep = row.get("keep_tokens")
    suffix = f" ({int(keep)})" if keep is not None and not _nan(keep) else ""
    return f"{row['method']} {100 * row['prune_rate']:.1f}%{suffix}"


def _legend(ax: Any) -> None:
    """Beside the axes, not on them: a curve that ends in a corner (ACCM's at high pruning) stays visible."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
