"""Cost model, per-setting summary, recommendation and report files, on synthetic sweep results."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.cost import (
    CostConfig,
    Gpu,
    Tier,
    cost_columns,
    setting_cost,
    tier_flops,
    usd_per_1m_from_throughput,
)
from pipeline.report import build_summary, recommend, summarize_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg() -> CostConfig:
    """Round numbers so that the expected prices can be worked out by hand."""
    gpus = {"A": Gpu("A", 1.0, 100.0), "B": Gpu("B", 4.0, 1000.0)}
    return CostConfig(
        gpus=gpus, captioner_tier=Tier("A", 1, mfu=0.5), lvlm_tier=Tier("B", 2, mfu=0.5, decode_mfu=0.1)
    )


def test_tier_split_puts_the_projector_on_the_lvlm_tier():
    f = {
        "flops_vision": 10.0,
        "flops_pruner": 1.0,
        "flops_captioner": 5.0,
        "flops_selector": 4.0,
        "flops_llm_prefill": 100.0,
        "flops_llm_decode": 7.0,
        "flops_total": 130.0,
    }
    assert tier_flops(f) == (20.0, 103.0, 7.0)  # 3 FLOPs of projector go with the prefill


def test_setting_cost_by_hand():
    cfg = _cfg()
    # captioner tier: 50 TFLOP / (100 TFLOPS * 0.5) = 1 s on A ($1/h)
    # LVLM tier: 500 TFLOP prefill / (1000 * 0.5) = 1 s, 10 TFLOP decode / (1000 * 0.1) = 0.1 s on B ($4/h)
    f = {"vision": 50e12, "llm_prefill": 500e12, "llm_decode": 10e12, "total": 560e12}
    c = setting_cost(f, cfg)
    assert c.captioner_gpu_s == pytest.approx(1.0)
    assert c.lvlm_gpu_s == pytest.approx(1.1)
    # cluster: 1 A -> 1 item/s, 2 B -> 2/1.1 = 1.82 items/s: the captioner tier is the bottleneck
    assert c.bottleneck == "captioner_tier"
    assert c.cluster_items_per_s == pytest.approx(1.0)
    assert c.usd_per_1m_cluster == pytest.approx((1 + 2 * 4) / 3600 * 1e6)
    assert c.usd_per_1m_rightsized == pytest.approx((1.0 * 1 + 1.1 * 4) / 3600 * 1e6)
    assert c.balanced_gpu_ratio == pytest.approx(1.1)
    # less LVLM work moves nothing while the captioner tier limits; more moves the bottleneck
    heavy = setting_cost({**f, "llm_prefill": 2000e12, "total": 2060e12}, cfg)
    assert heavy.bottleneck == "lvlm_tier" and heavy.usd_per_1m_cluster > c.usd_per_1m_cluster


def test_measured_price_and_config_overrides(tmp_path):
    assert usd_per_1m_from_throughput(100.0, 36.0) == pytest.approx(100.0)  # $0.01/s / 100 items/s
    assert math.isnan(usd_per_1m_from_throughput(0.0, 36.0))
    path = tmp_path / "prices.yaml"
    path.write_text(
        "prices_as_of: '2030-01'\ngpus:\n  X: {usd_per_hour: 9.0, peak_tflops: 2000}\n"
        "lvlm_tier: {gpu: X, count: 4}\n"
    )
    cfg = CostConfig.load(path)
    assert cfg.lvlm_tier.gpu == "X" and cfg.lvlm_tier.count == 4 and cfg.lvlm_tier.mfu == Tier("H100", 1).mfu
    assert cfg.captioner_tier == CostConfig().captioner_tier and "L4" in cfg.gpus
    assert cfg.cluster_usd_per_hour == pytest.approx(4 * 9.0 + 16 * 0.80)
    assert "2030-01" in cfg.describe()
    assert CostConfig.from_dict(CostConfig().to_dict()) == CostConfig()
    assert CostConfig().with_tiers(lvlm="H200x2").lvlm_tier.count == 2
    with pytest.raises(KeyError, match="no price"):
        CostConfig.from_dict({"lvlm_tier": {"gpu": "TPU"}})


def _rows(n: int, correct: int, *, method: str, keep: int, errors: int = 0) -> pd.DataFrame:
    qtypes = ["color", "count"]
    return pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(n)],
            "question_type": [qtypes[i % 2] for i in range(n)],
            "answers": [["red"]] * n,
            "method": method,
            "keep_tokens": keep,
            "visual_tokens_total": 64,
            "score": [1.0 if i < correct else 0.0 for i in range(n - errors)] + [None] * errors,
            "error": [None] * (n - errors) + ["bad image"] * errors,
            "flops_vision": 10e6,
            "flops_pruner": 0.0,
            "flops_captioner": 0.0,
            "flops_selector": 0.0,
            "flops_llm_prefill": keep * 1e6,
            "flops_llm_decode": 1e6,
            "flops_total": 11e6 + keep * 1e6,
            "flops_reference_total": 75e6,
        }
    )


def test_summarize_rows_leaves_errors_out_and_splits_question_types():
    s = summarize_rows(_rows(10, correct=6, method="fastv", keep=16, errors=2), wall_time_s=2.0)
    assert s["items"] == 10 and s["errors"] == 2 and s["scored"] == 8
    assert s["accuracy"] == pytest.approx(6 / 8)  # the 8 rows without error, 6 of them right
    assert s["acc_color"] == pytest.approx(3 / 4) and s["acc_count"] == pytest.approx(3 / 4)
    assert s["prune_rate"] == pytest.approx(0.75) and s["keep_tokens"] == 16
    assert s["flops_total"] == pytest.approx(27e6) and s["items_per_s"] == pytest.approx(5.0)


def _sweep() -> pd.DataFrame:
    """none 80%; fastv falls fast; accm stays close. FLOPs fall with the kept tokens."""
    settings = [
        {
            "rows": _rows(100, 80, method="none", keep=64),
            "method": "none",
            "prune_rate": 0.0,
            "wall_time_s": 4.0,
        }
    ]
    for rate, keep, fastv_ok, accm_ok in [
        (0.5, 32, 76, 80),
        (0.75, 16, 65, 79),
        (0.875, 8, 50, 78),
        (0.9375, 4, 40, 70),
    ]:
        settings.append(
            {
                "rows": _rows(100, fastv_ok, method="fastv", keep=keep),
                "method": "fastv",
                "prune_rate": rate,
                "wall_time_s": 3.0,
            }
        )
        settings.append(
            {
                "rows": _rows(100, accm_ok, method="accm", keep=keep),
                "method": "accm",
                "prune_rate": rate,
                "wall_time_s": 3.5,
            }
        )
    return build_summary(settings)


def test_recommendation_picks_cheapest_setting_within_tolerance():
    table = cost_columns(_sweep(), CostConfig())
    assert list(table["method"].unique()) == ["none", "fastv", "accm"] and len(table) == 9
    rec = recommend(table)  # within 2 points of 80%: accm at 87.5% (78%) is the cheapest
    assert (rec.method, rec.prune_rate) == ("accm", 0.875)
    assert rec.accuracy == pytest.approx(0.78) and rec.baseline_accuracy == pytest.approx(0.80)
    assert 0 < rec.saving < 1
    assert (
        recommend(table, tolerance_points=0.0).method,
        recommend(table, tolerance_points=0.0).prune_rate,
    ) == ("accm", 0.5)
    loose = recommend(table, target_accuracy=65.0)  # fastv 75% (65%) and accm 93.75% (70%) qualify
    assert (loose.method, loose.prune_rate) == ("accm", 0.9375)
    mid = recommend(table, target_accuracy=72.0)
    assert (mid.method, mid.prune_rate, mid.threshold) == ("accm", 0.875, 0.72)
    strict = recommend(table, target_accuracy=90.0)
    assert strict is None


def test_write_report_files(tmp_path):
    path = write_report(_sweep(), tmp_path, tolerance_points=2.0, notes=["synthetic"])
    text = path.read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {
        "accuracy_vs_flops.png",
        "accuracy_vs_prune_rate.png",
        "flops_components.png",
        "throughput.png",
    } <= set(pngs)
    for p in pngs:
        data = (tmp_path / p).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
        assert f"]({p})" in text
    assert "`accm` at 87.50% pruning" in text
    assert "| accm | 93.75% | 4 |" in text  # a cost-table line
    assert "$/1M (cluster)" in text and "MFU" in text and CostConfig().prices_as_of in text
    table = pd.read_csv(tmp_path / "cost_table.csv")
    assert len(table) == 9 and table["usd_per_1m_cluster"].gt(0).all()
    assert "$/1M (measured)" not in text  # CPU run: no cluster price, no measured column
    text2 = write_report(_sweep(), tmp_path / "m", measured_usd_per_hour=36.0).read_text()
    assert "$/1M (measured)" in text2


def test_main_job_summary_and_sweep_summary_share_one_accuracy():
    """A setting with errored rows, a row without answers and a stale score on an errored row: the main
    job's summary.json (``summarize`` on the output table) and the sweep's summary (``summarize_rows`` on
    the same rows) give the same accuracy, scored count and error count."""
    import pyarrow as pa

    from pipeline.summary import Accuracy, accuracy, summarize

    rows = _rows(12, correct=5, method="accm", keep=8, errors=3)
    rows.loc[1, "answers"] = None  # no ground truth: no score, not counted
    rows.loc[1, "score"] = None
    rows.loc[11, "score"] = 1.0  # an errored row is left out even if it carries a score
    table = pa.Table.from_pandas(rows, preserve_index=False)
    job = summarize(table, run={"wall_s": 1.0, "rows_processed": 12})
    sweep = summarize_rows(rows, wall_time_s=1.0)
    want = accuracy(rows["score"].tolist(), rows["error"].tolist())
    assert (want.scored, want.errors) == (8, 3) and want.accuracy == pytest.approx(4 / 8)
    assert job["accuracy"] == pytest.approx(sweep["accuracy"]) == pytest.approx(want.accuracy)
    assert job["scored_items"] == sweep["scored"] == 8 and job["errors"] == sweep["errors"] == 3
    for qtype in ("color", "count"):
        assert job["accuracy_per_question_type"][qtype] == pytest.approx(sweep[f"acc_{qtype}"])
    assert accuracy([None, 0.5], ["bad", None]) == Accuracy(0.5, scored=1, errors=1)
    assert accuracy([], []).accuracy is None


def test_papers_table_relative_score_by_hand():
    """Headline per benchmark, relative % = mean of score / unpruned score; undefined where one is missing."""
    from pipeline.benchmark_table import add_benchmark_columns, paper_table_markdown, with_relative_accuracy

    summary = pd.DataFrame({"method": ["none", "accm", "prumerge_plus"], "prune_rate": [0.0, 0.875, 0.875],
                            "keep_tokens": [576, 72, 72], "flops_total": [4e12, 1e12, 0.9e12],
                            "usd_per_1m_rightsized": [10.0, 3.0, 2.5], "accuracy": [0.5, 0.4, 0.3]})
    benchmarks = {("none", 0.0): {"pope": {"f1_mean_pct": 80.0}, "mme": {"perception": 1500.0}},
                  ("accm", 0.875): {"pope": {"f1_mean_pct": 76.0}, "mme": {"perception": 1200.0}},
                  ("prumerge_plus", 0.875): {"pope": {"f1_mean_pct": None}, "mme": {"perception": 900.0}}}
    table = add_benchmark_columns(summary, benchmarks)
    assert table["relative_score"].iloc[0] == pytest.approx(100.0)
    assert table["relative_score"].iloc[1] == pytest.approx((95.0 + 80.0) / 2)
    assert math.isnan(table["relative_score"].iloc[2])
    assert with_relative_accuracy(table)["accuracy"].iloc[1] == pytest.approx(0.875)
    md = paper_table_markdown(table)
    assert "| method | kept tokens | pope (F1 %) | mme (perception score) | TFLOPs/item | relative % |" in md
    assert "| accm | 72 | 76.0 | 1200.0 | 1.0000 | 87.5 | $3.00 |" in md
    assert "| prumerge_plus | 72 | - | 900.0 |" in md


def test_recommendation_per_benchmark_on_its_relative_score():
    from pipeline.benchmark_table import add_benchmark_columns, per_task_recommendations

    summary = pd.DataFrame({"method": ["none", "accm", "prumerge_plus"], "prune_rate": [0.0, 0.875, 0.875],
                            "keep_tokens": [576, 72, 72], "flops_total": [4e12, 1e12, 0.9e12],
                            "usd_per_1m_rightsized": [10.0, 3.0, 2.5], "accuracy": [0.5, 0.4, 0.3]})
    benchmarks = {("none", 0.0): {"pope": {"f1_mean_pct": 80.0}, "mme": {"perception": 1500.0}},
                  ("accm", 0.875): {"pope": {"f1_mean_pct": 79.0}, "mme": {"perception": 1200.0}},
                  ("prumerge_plus", 0.875): {"pope": {"f1_mean_pct": 70.0}, "mme": {"perception": 1490.0}}}
    lines = per_task_recommendations(add_benchmark_columns(summary, benchmarks), tolerance_points=2.0,
                                     target_accuracy=None)
    # pope: accm keeps 98.75% (within 2 points), prumerge_plus 87.5%; mme: prumerge_plus keeps 99.3% and is cheaper
    assert lines[0].startswith("- **pope**") and "`accm` at 87.50%" in lines[0]
    assert lines[1].startswith("- **mme**") and "`prumerge_plus` at 87.50%" in lines[1]


def test_a_method_has_one_colour_in_every_plot() -> None:
    """Colours follow the method, not its place in a sweep's table, so plots of different sweeps agree."""
    from pipeline.config import METHODS
    from pipeline.plots import method_colour

    colours = [method_colour(m) for m in METHODS]
    assert len(set(colours)) == len(METHODS)  # nine methods, ten tab10 colours: no two alike
    assert method_colour("accm") == method_colour("accm") and method_colour("new_method").startswith("C")
