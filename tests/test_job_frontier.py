"""The frontier pruners through the real job: CDPruner, DivPrune and DART in one sweep graph, ACCM over another
base pruner (--accm-base), the shipped proving-ground models on the bundled test shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.jobs import V1_MODEL_ARGS, load_job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sweep_module():
    return load_job("sweep_pruning_rates")


def test_new_methods_and_accm_over_divprune_in_one_sweep(tmp_path, monkeypatch):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "sweep"
    rc = _sweep_module().main(
        ["--output", str(out), "--methods", "none,cdpruner,divprune,dart,accm", "--prune-rates", "0.875",
         "--limit", "16", "--batch-size", "8", "--accm-base", "divprune", "--max-new-tokens", "4",
         # the first world's demo rows and shipped models (64 visual tokens: 8 kept at 87.5%)
         "--input", str(ROOT / "data/shapes_vqa/test"), *V1_MODEL_ARGS]
    )  # fmt: skip
    assert rc == 0
    rows = {m: [r for f in sorted((out / m / ("0" if m == "none" else "0.875")).glob("*.parquet"))
                for r in pq.read_table(f).to_pylist()]
            for m in ("none", "cdpruner", "divprune", "dart", "accm")}  # --limit 16: all in the first shard
    for method, table in rows.items():
        assert len(table) == 16 and all(r["error"] is None and r["prediction"] is not None for r in table), method
    for method in ("cdpruner", "divprune", "accm"):  # pre-LLM: 8 of 64 tokens reach the LLM, cheaper than none
        assert {r["keep_tokens"] for r in rows[method]} == {8}, method
        assert rows[method][0]["flops_total"] < rows["none"][0]["flops_total"], method
    for method in ("cdpruner", "divprune", "dart"):  # each prices its own selection
        assert all(r["flops_pruner"] > 0 for r in rows[method]), method
    assert {r["pruner_options"] for r in rows["accm"]} == {"accm_base=divprune"}
    assert {r["pruner_options"] for r in rows["dart"]} == {"dart_layer=2; dart_count=code"}
    assert {r["pruner_options"] for r in rows["cdpruner"]} == {"cdpruner_sign=none (no --clip: plain DPP)"}
    assert all(r["caption"] is not None for r in rows["accm"])
    # DART prunes inside the LLM: the LLM prefill is cheaper than none's, the projector is not
    assert rows["dart"][0]["flops_llm_prefill"] < rows["none"][0]["flops_llm_prefill"]
    assert rows["dart"][0]["flops_projector"] == rows["none"][0]["flops_projector"]
    md = (out / "report" / "report.md").read_text()
    for method in ("cdpruner", "divprune", "dart"):
        assert f"| {method} | 87.50% | 8 |" in md, method
    summary = json.loads((out / "accm" / "0.875" / "summary.json").read_text())
    assert summary["items"] == 16
