"""jobs/plot_lvlm_runs.py: the chart plots each run's stage-2 val evaluations, per question type, from its log."""

from __future__ import annotations

import json

import pytest

from jobs import plot_lvlm_runs as P


def _log(accuracies: list[float]) -> dict:
    """A train_lvlm_v2 training log: one stage-1 evaluation, then stage-2 ones every 300 steps."""
    evals = [{"stage": 1, "step": 750, "val": {"all": 0.4, "shape": 0.2, "spatial": 0.1, "count": 0.3}}]
    for i, a in enumerate(accuracies):
        evals.append({"stage": 2, "step": 300 * (i + 1),
                      "val": {"all": a, "shape": a / 2, "spatial": 1 - a, "count": a}})
    return {"evals": evals}


def test_series_are_the_stage2_evaluations_in_percent_and_the_png_is_written(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_log([0.3, 0.5, 0.7])))
    b.write_text(json.dumps(_log([0.2, 0.6])))
    out = tmp_path / "fig" / "runs.png"
    series = P.main(["--run", f"long={a}", "--run", f"short={b}", "--types", "shape,spatial", "--out", str(out)])
    assert list(series) == ["all", "shape", "spatial"]  # count not asked for
    assert series["all"]["long"] == ([300, 600, 900], pytest.approx([30.0, 50.0, 70.0]))
    assert series["shape"]["short"] == ([300, 600], pytest.approx([10.0, 30.0]))
    assert series["spatial"]["long"][1] == pytest.approx([70.0, 50.0, 30.0])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_a_label_is_refused():
    with pytest.raises(SystemExit):
        P.parse_args(["--run", "nolabel.json", "--out", "x.png"])
