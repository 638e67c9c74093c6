"""The GPU benchmark script must not rot: it exits 0 without CUDA, and its --smoke mode runs every case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_without_cuda_exits_cleanly_and_smoke_runs():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if not torch.cuda.is_available():
        plain = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, env=env)
        assert plain.returncode == 0 and "no CUDA" in plain.stdout
    smoke = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert smoke.returncode == 0, smoke.stderr
    for name in ("head_mean_query_scores", "cls_attention_scores", "cosine_scores", "split_topk", "compact_rows", "compact_kv"):
        assert name in smoke.stdout
