"""benchmarks/bench_lvlm_precision.py: the chain's stage-2 step runs in float32 and under bf16 autocast on the same
batches, and the two losses agree (the ratio itself is a measurement, printed by the benchmark, not asserted)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lvlm_precision.py"


def test_both_precisions_time_the_same_steps_and_their_losses_agree(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_lvlm_precision", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench.T, "native_bf16", lambda: True)  # bf16 autocast runs (slowly) on any CPU
    out = bench.main(["--preset", "tiny", "--steps", "2", "--threads", "1", "--start", "700"])
    assert set(out["seconds"]) == {"fp32", "bf16"} and all(v > 0 for v in out["seconds"].values())
    assert out["speedup"] > 0 and out["max_loss_gap"] < 0.05  # bf16 rounding, not another computation
    assert "speedup of bf16 autocast" in capsys.readouterr().out
    monkeypatch.setattr(bench.T, "native_bf16", lambda: False)
    assert bench.main(["--preset", "tiny"]) == {}  # nothing timed where auto would train in float32
