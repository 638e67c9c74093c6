"""Plot from-scratch LVLM runs side by side: val accuracy by stage-2 step, from their training logs.

The design note compares LVLM recipes by tables of val accuracy at each evaluation; a chart reads faster when
several runs and several question types are compared at once. Each ``--run LABEL=PATH`` names a
``training_log.json`` written by ``jobs/train_lvlm_v2.py`` (its ``evals`` list). One panel per series (all
questions, then the question types asked for), one line per run, stage-2 steps on the x axis (stage 1's
evaluations are left out: the runs being compared share it).

    .venv/bin/python jobs/plot_lvlm_runs.py \\
        --run "2200 steps=docs/reports/proving-ground-v2/chain_end_to_end/lvlm_training_log.json" \\
        --run "4000 steps=docs/reports/proving-ground-v2/lvlm_from_scratch_4000_step_stage2_training_log.json" \\
        --out docs/reports/proving-ground-v2/lvlm_from_scratch_runs.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jobs.train_utils import log  # noqa: E402

DEFAULT_TYPES = ("shape", "spatial", "count")


def stage2_series(training_log: dict, key: str, split: str = "val") -> tuple[list[int], list[float]]:
    """(stage-2 steps, accuracy in %) of one question type (``all`` for every question) on ``split``."""
    points = [(e["step"], 100 * e[split][key]) for e in training_log["evals"] if e.get("stage") == 2]
    return [s for s, _ in points], [a for _, a in points]


def plot_runs(runs: dict[str, dict], out: Path, types: tuple[str, ...] = DEFAULT_TYPES) -> dict:
    """Draw the chart at ``out``; returns the plotted series ({panel: {run: (steps, accuracy)}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("all", *types)
    series = {p: {label: stage2_series(lg, p) for label, lg in runs.items()} for p in panels}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.9), sharey=True)
    for ax, panel in zip(axes, panels, strict=True):
        for label, (steps, acc) in series[panel].items():
            ax.plot(steps, acc, marker="o", markersize=3, label=label)
        ax.set_title("all questions" if panel == "all" else panel)
        ax.set_xlabel("stage-2 step")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return series


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--run takes LABEL=PATH, got {text!r}")
    return label, Path(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=parse_run, action="append", required=True,
                   help="LABEL=PATH of a train_lvlm_v2 training_log.json (repeat for each run)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES),
                   help="question types to plot beside all questions (comma-separated)")
    p.add_argument("--out", type=Path, required=True, help="where the PNG goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = {label: json.loads(path.read_text()) for label, path in args.run}
    series = plot_runs(runs, args.out, tuple(t for t in args.types.split(",") if t))
    log(f"plotted {len(runs)} runs x {len(series)} panels to {args.out}")
    return series


if __name__ == "__main__":
    main()
