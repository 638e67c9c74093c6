"""Sweep job: estimate mode for LLaVA-1.5 (no Ray) and one real sweep on Ray with S3 output."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pytest

from tests.jobs import V1_MODEL_ARGS, load_job

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    return load_job("sweep_pruning_rates")


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


def _stable_error(error: str | None) -> str | None:
    """PIL's decode errors name a BytesIO object by its address: the same error, a different text."""
    import re

    return re.sub(r" at 0x[0-9a-f]+", "", error) if error else None


@pytest.mark.slow
def _tiny_clip(path, tokenizer, *, vision_hidden: int) -> None:
    """A small random ``CLIPModel`` folder (text tower + projections, vision width of the LVLM's tower)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, image_size=64, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_shared_encoding_sweep_answers_like_the_main_job_per_setting(tmp_path, monkeypatch):
    """One graph, one vision encoding per item, four settings (full tokens, FastV inside the LLM, VisionZip,
    ACCM with captions) over two shards with a corrupt image: the same answers per (item, setting) as the
    main job run once per setting (``--sequential``), in the same layout, and an exact ``--resume``."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from actors.captioner import build_caption_model
    from actors.selector import build_selector
    from actors.tiny import build_tiny_llava, build_tokenizer
    from pipeline import shapes
    from pipeline.schema import INPUT_SCHEMA, output_schema

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    build_tiny_llava(tmp_path / "lvlm", vision_layers=2, text_layers=2)
    build_caption_model(build_tokenizer(), feature_dim=64, hidden=32, decoder_layers=1, mapper_layers=1,
                        max_caption_tokens=4).save_pretrained(tmp_path / "captioner")
    build_selector(text_hidden=32, text_layers=1, projection_dim=32, layers=1).save_pretrained(tmp_path / "selector")
    _tiny_clip(tmp_path / "clip", build_tokenizer(), vision_hidden=64)  # --clip: ACCM's base pruner's text picks
    rows = [shapes.item_row(shapes.make_item(5, "test", i)) for i in range(7)]
    rows[5] = dict(rows[5], image=b"not an image")
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=INPUT_SCHEMA), src / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:], schema=INPUT_SCHEMA), src / "b.parquet")
    settings = [("none", "0"), ("fastv", "0.75"), ("visionzip", "0.75"), ("accm", "0.75")]
    common = ["--input", str(src), "--methods", "none,fastv,visionzip,accm", "--prune-rates", "0.75",
              "--lvlm", str(tmp_path / "lvlm"), "--captioner", str(tmp_path / "captioner"),
              "--selector", str(tmp_path / "selector"), "--fastv-layer", "1", "--batch-size", "3",
              "--clip", str(tmp_path / "clip"), "--text-pick", "farthest",
              "--model-cache", str(tmp_path / "cache")]  # fmt: skip
    sweep = _sweep_module()
    shared, sequential = tmp_path / "shared", tmp_path / "sequential"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert sweep.main([*common, "--output", str(shared)]) == 0
        first = pd.read_parquet(shared / "summary.parquet")
        sweep_wall = json.loads((shared / "none" / "0" / "summary.json").read_text())["sweep_wall_s"]
        assert sweep.main([*common, "--output", str(sequential), "--sequential"]) == 0
        before = {p: p.stat().st_mtime_ns for p in shared.glob("*/*/*.parquet")}
        assert sweep.main([*common, "--output", str(shared), "--resume"]) == 0  # all marked: nothing redone
    finally:
        ray.shutdown()

    columns = ["id", "prediction", "error", "score", "keep_tokens", "caption", "flops_total", "method"]
    want_schema = output_schema(INPUT_SCHEMA)
    summary = pd.read_parquet(shared / "summary.parquet").set_index("method")
    for method, rate in settings:
        for name in ("a.parquet", "b.parquet"):
            got_table = pq.read_table(shared / method / rate / name)
            assert got_table.schema.equals(want_schema, check_metadata=False)
            assert (shared / method / rate / "_done" / f"{name}.json").exists()
            got = got_table.select(columns).to_pylist()
            ref = pq.read_table(sequential / method / rate / name, columns=columns).to_pylist()
            assert [r["id"] for r in got] == [r["id"] for r in ref]
            for g, r in zip(got, ref, strict=True):
                g["error"], r["error"] = _stable_error(g["error"]), _stable_error(r["error"])
                assert g == pytest.approx(r), (method, rate, g, r)
        out = pq.read_table(shared / method / rate / "b.parquet").to_pylist()
        assert sum(r["error"] is not None for r in out) == 1  # the corrupt image: one error row per setting
        assert all(isinstance(r["prediction"], str) for r in out if r["error"] is None)
        job = json.loads((shared / method / rate / "summary.json").read_text())
        assert job["rows_processed"] == 0 and job["shards_skipped"] == 2  # from the --resume run
        assert job["items"] == 7 and job["errors"] == 1 and job["scored_items"] == 6
        line = summary.loc[method]
        assert (line["items"], line["errors"], line["scored"]) == (7, 1, 6)
        assert line["accuracy"] == pytest.approx(job["accuracy"])  # one accuracy definition
    accm = pq.read_table(shared / "accm" / "0.75" / "a.parquet").to_pylist()
    assert all(r["caption"] for r in accm)
    assert {r["text_pick"] for r in accm} == {"farthest"} and all(r["clip_model"] for r in accm)
    vz = pq.read_table(shared / "visionzip" / "0.75" / "a.parquet").to_pylist()
    assert all(r["text_pick"] is None for r in vz)  # no text picks in visionzip
    # the text guide's tower and projections are priced: ACCM's pruner costs more than a CLS score alone
    assert min(r["flops_pruner"] for r in accm) > 10 * max(r["flops_pruner"] for r in vz)
    assert len(before) == 8 and {p: p.stat().st_mtime_ns for p in before} == before
    assert (first["items_per_s"] > 0).all() and (shared / "report" / "report.md").exists()
    assert first["wall_time_s"].sum() == pytest.approx(sweep_wall)  # the settings' shares of one wall time
    assert summary["items_per_s"].isna().all()  # the --resume run processed nothing: no throughput claimed


@pytest.mark.slow
def test_sweep_over_two_benchmark_tasks_in_one_graph(tmp_path, monkeypatch):
    """--tasks pope,mmbench over the bundled demo: each setting's official metrics per task equal the task's
    aggregate recomputed from its output rows, and the report has the papers' table."""
    import json

    import pyarrow.parquet as pq

    from pipeline import tasks

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "sweep"
    rc = _sweep_module().main(
        ["--tasks", "pope,mmbench", "--output", str(out), "--methods", "none,accm", "--prune-rates", "0.875",
         "--limit", "12", "--answer-suffix", "none", "--max-new-tokens", "4", "--batch-size", "6",
         # the bundled benchmark demo is of the first world: its shipped models
         *V1_MODEL_ARGS]
    )  # fmt: skip
    assert rc == 0
    for setting in ("none/0", "accm/0.875"):
        summary = json.loads((out / setting / "summary.json").read_text())
        assert summary["items"] == 24 and set(summary["benchmarks"]) == {"pope", "mmbench"}
        for task, name in (("pope", "llava_pope_test.parquet"), ("mmbench", "mmbench_shapes_test.parquet")):
            rows = pq.read_table(out / setting / task / name).to_pylist()
            assert len(rows) == 12 and all(r["error"] is None for r in rows)
            expected = tasks.get(task).aggregate(rows)
            got = summary["benchmarks"][task]
            key = tasks.get(task).HEADLINE
            assert got[key] == pytest.approx(expected[key], nan_ok=True), (task, setting)
        pope_rows = pq.read_table(out / setting / "pope" / "llava_pope_test.parquet").to_pylist()
        assert {type(r["question_id"]) for r in pope_rows} == {int} and all(r["question_type"] for r in pope_rows)
    md = (out / "report" / "report.md").read_text()
    assert "## Benchmarks (the papers' table)" in md
    assert "| method | kept tokens | pope (F1 %) | mmbench (acc %) | TFLOPs/item | relative % |" in md
    assert "| none | 64 |" in md and "| 100.0 |" in md
    assert (out / "report" / "benchmarks.png").stat().st_size > 0
    summary = pd.read_parquet(out / "summary.parquet")
    assert {"bench_pope", "bench_mmbench", "relative_score"} <= set(summary.columns)


def test_keeps_become_rates_of_the_lvlm_token_count(tmp_path):
    """--keeps 32,8 on the shipped 64-token LVLM = rates 0.5 and 0.875; a keep outside (0, 64) is refused."""
    import json

    sweep = _sweep_module()
    assert sweep.keep_rates("32,8", (str(ROOT / "models/shapes/lvlm"), None)) == [0.5, 0.875]
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336, "patch_size": 14}}))
    rates = sweep.keep_rates("192,72,18", (str(tmp_path), None))
    assert [round(576 * (1 - r)) for r in rates] == [192, 72, 18]
    with pytest.raises(SystemExit, match="--keeps: 64"):
        sweep.keep_rates("64", (str(ROOT / "models/shapes/lvlm"), None))
