"""Sweep job: estimate mode for LLaVA-1.5 (no Ray) and one real sweep on Ray with S3 output."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_pruning_rates", ROOT / "jobs/sweep_pruning_rates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_settings_run_full_tokens_once():
    sweep = _sweep_module()
    got = sweep.settings_for(["none", "fastv", "none"], [0.5, 0.875])
    assert got == [("none", 0.0), ("fastv", 0.5), ("fastv", 0.875)]


def test_per_setting_flags_are_refused():
    sweep = _sweep_module()
    with pytest.raises(SystemExit, match="set per setting"):
        sweep.main(["--methods", "none", "--prune-rate", "0.5"])


def _table_rows(text: str) -> pd.DataFrame:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    df = pd.DataFrame(cells).iloc[:, [0, 2, 3, 8]]
    df.columns = ["method", "kept", "flops", "usd"]
    df["kept"] = df["kept"].astype(int)
    df["usd"] = df["usd"].str.lstrip("$").str.replace(",", "").astype(float)
    return df


def test_estimate_mode_llava_7b_and_13b(tmp_path, capsys):
    sweep = _sweep_module()
    assert sweep.main(["--estimate", "llava-1.5-7b", "--output", str(tmp_path)]) == 0
    out7 = capsys.readouterr().out
    t7 = _table_rows(out7)
    assert len(t7) == 1 + 4 * 5  # none once, four methods at 192/128/64/36/18
    assert set(t7[t7.method == "accm"].kept) == {192, 128, 64, 36, 18}
    assert t7[t7.method == "none"].kept.tolist() == [576]
    for method, group in t7[t7.method != "none"].groupby("method"):
        usd = group.sort_values("kept", ascending=False).usd.tolist()
        assert usd == sorted(usd, reverse=True), f"{method}: fewer tokens must not cost more"
        assert max(usd) < t7[t7.method == "none"].usd.iloc[0]
    # ACCM pays for its caption model and selector at the same kept tokens
    at36 = t7[t7.kept == 36].set_index("method").usd
    assert at36["accm"] > at36["prumerge_plus"]
    assert "MFU" in out7 and "L4" in out7 and "H100" in out7
    report = tmp_path / "report"
    assert (report / "report.md").exists() and len(list(report.glob("*.png"))) >= 3
    assert len(pd.read_parquet(report / "summary.parquet")) == 21

    assert sweep.main(["--estimate", "llava-1.5-13b", "--cost-lvlm-tier", "H200x8"]) == 0
    out13 = capsys.readouterr().out
    t13 = _table_rows(out13)
    assert (t13.usd.to_numpy() > t7.usd.to_numpy()).all(), "13B costs more than 7B at every setting"
    assert "8 x H200" in out13


def _write_inputs(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import shapes
    from pipeline.schema import INPUT_SCHEMA

    path.mkdir(parents=True)
    rows = [shapes.item_row(shapes.make_item(0, "test", i)) for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), path / "part-0.parquet")


@pytest.mark.slow
def test_sweep_on_ray_to_s3(tmp_path, s3_server, tmp_bucket, monkeypatch, capsys):
    """Two settings of the real graph (tiny random LLaVA), output and report on moto S3."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from actors.tiny import build_tiny_llava

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    build_tiny_llava(tmp_path / "lvlm", text_layers=3)
    _write_inputs(tmp_path / "in", 8)
    out = f"s3://{tmp_bucket}/sweep"
    sweep = _sweep_module()
    rc = sweep.main(
        ["--input", str(tmp_path / "in"), "--output", out, "--methods", "none,prumerge_plus",
         "--prune-rates", "0.875", "--lvlm", str(tmp_path / "lvlm"), "--batch-size", "8",
         "--model-cache", str(tmp_path / "cache")]
    )  # fmt: skip
    assert rc == 0
    keys = s3_server.keys(tmp_bucket, "sweep/")
    assert "sweep/none/0/part-0.parquet" in keys and "sweep/prumerge_plus/0.875/part-0.parquet" in keys
    assert "sweep/summary.parquet" in keys
    for name in (
        "report.md",
        "cost_table.csv",
        "accuracy_vs_flops.png",
        "flops_components.png",
        "throughput.png",
    ):
        assert f"sweep/report/{name}" in keys
    body = s3_server.client.get_object(Bucket=tmp_bucket, Key="sweep/summary.parquet")["Body"].read()
    summary = pd.read_parquet(io.BytesIO(body)).set_index("method")
    assert summary.loc["none", "items"] == 8 and summary.loc["prumerge_plus", "items"] == 8
    assert summary.loc["prumerge_plus", "keep_tokens"] == 8 and summary.loc["none", "keep_tokens"] == 64
    assert summary.loc["prumerge_plus", "flops_total"] < summary.loc["none", "flops_total"]
    assert (summary["items_per_s"] > 0).all()
    md = s3_server.client.get_object(Bucket=tmp_bucket, Key="sweep/report/report.md")["Body"].read().decode()
    assert "| prumerge_plus | 87.50% | 8 |" in md and "## Recommendation" in md
    assert "report:" in capsys.readouterr().out
