"""benchmarks/bench_gpu.py: skips cleanly without CUDA, and its --quick --allow-cpu smoke run covers every
setting with sane numbers (the GPU run itself is not part of the suite)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
SKIP = "no CUDA GPU: nothing measured"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_without_cuda_main_prints_the_skip_line_and_returns_0(no_cuda, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert _bench().main(["--out", str(out)]) == 0
    assert SKIP in capsys.readouterr().out
    assert not out.exists()  # nothing measured, nothing written


def test_without_cuda_the_script_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert SKIP in proc.stdout


def test_allow_cpu_needs_quick(no_cuda):
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--allow-cpu"])
    assert exc.value.code == 2


def test_quick_cpu_smoke_run_covers_every_setting(no_cuda, tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = _bench().main(
        ["--quick", "--allow-cpu", "--repeats", "1", "--threads", "1", "--out", str(out), "--md", str(md)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["quick"] and report["dtype"] == "float32" and report["skipped"] == []
    assert report["shape"]["text_layers"] == 2 and report["shape"]["vision_layers"] == 2
    assert report["visual_tokens"] == 576 and report["batches"] == [2]
    pre = report["pre_method"]
    assert pre in ("prumerge_plus", "visionzip")
    expected = {(2, "ours", "none", 576), (2, "hf", "hf_generate_sdpa", 576)}
    expected |= {(2, "ours", m, k) for k in (192, 72, 36) for m in (pre, "fastv")}
    expected |= {(2, "ours", m, 72) for m in report["more_methods"] if m not in (pre, "fastv")}
    assert {"dart", "cdpruner", "divprune"} <= set(report["more_methods"])
    rows = {(r["batch"], r["engine"], r["method"], r["kept"]): r for r in report["settings"]}
    assert set(rows) == expected
    for key, r in rows.items():
        assert "error" not in r, (key, r.get("error"))
        assert math.isfinite(r["items_per_s"]) and r["items_per_s"] > 0, key
        assert r["new_tokens"] == [8], key
    none = rows[(2, "ours", "none", 576)]
    assert none["e2e_items_per_s"] > 0 and none["llm_gflops"] > 0
    for k in (192, 72, 36):
        for m in (pre, "fastv"):
            r = rows[(2, "ours", m, k)]
            assert math.isfinite(r["flops_ratio"]) and r["flops_ratio"] > 1, (m, k)
            assert math.isfinite(r["speedup"]) and r["speedup"] > 0, (m, k)
            assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
        # fewer kept tokens, less work; the pre-LLM pruner shortens the prompt itself
        assert rows[(2, "ours", pre, k)]["prefill_len_mean"] == none["prefill_len_mean"] - 576 + k
    assert rows[(2, "ours", pre, 36)]["flops_ratio"] > rows[(2, "ours", pre, 192)]["flops_ratio"]
    assert rows[(2, "ours", "fastv", 36)]["flops_ratio"] > rows[(2, "ours", "fastv", 192)]["flops_ratio"]
    hf = rows[(2, "hf", "hf_generate_sdpa", 576)]
    assert hf["attn_implementation"] == "sdpa" and hf["same_prompt_as_engine"] is True
    assert hf["ours_e2e_over_hf"] > 0 and hf["ours_generate_over_hf"] > 0
    assert hf["greedy_tokens_equal"] >= 0.5  # fp32, same weights and prompts: same greedy tokens (seen: all)
    names = [t["name"] for t in report["targets"]]
    at_72 = {m for (_, engine, m, k) in rows if engine == "ours" and k == 72}  # every method measured at 72
    assert len(at_72) == 2 + len(set(report["more_methods"]) - {pre, "fastv"})
    assert len(names) == 1 + len(at_72) and any("ours/HF" in n for n in names)
    assert {m for m in at_72 if any(f"{m} at 72 kept" in n for n in names)} == at_72
    kernels = report["kernels"]
    assert kernels.get("rows") or kernels.get("skipped") == "triton is not installed", kernels
    assert "speedup/FLOPs" in md.read_text() and "| 2 | hf |" in md.read_text()
    assert "sp/FLOPs" in printed and "ours/HF items/s" in printed


def test_budget_spent_skips_and_lists_every_setting(no_cuda, tmp_path):
    out = tmp_path / "r.json"
    assert _bench().main(["--quick", "--allow-cpu", "--budget-s", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"] == [] and report["targets"] == []
    assert len(report["skipped"]) == 8 + 5 + 1 and report["skipped"][-1] == "kernels"  # + the 5 --more-methods
    assert "batch 2 none@576" in report["skipped"] and "batch 2 hf@576" in report["skipped"]
