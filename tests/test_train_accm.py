"""jobs/train_accm.py --smoke: both stages on Ray Train + DeepSpeed ZeRO-2, checkpoint, resume, ablation eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_accm_smoke_runs_resumes_and_evaluates(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "jobs/train_accm.py", "--smoke", "--workdir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    (work,) = tmp_path.glob("accm-smoke-*")
    summary = json.loads((work / "summary.json").read_text())

    assert summary["pretrain"]["step"] == 2
    assert summary["accm"]["step"] == 2 and summary["accm"]["started_at"] == 0
    # same run name again: Ray Train hands the worker its latest checkpoint; DeepSpeed state restored
    assert summary["accm-resume"]["started_at"] == 2 and summary["accm-resume"]["step"] == 3
    ckpt = Path(summary["accm-resume"]["checkpoint"])
    assert (ckpt / "ds" / "latest_ds").is_dir()

    table = summary["eval"]
    for key in ("all tokens", "87.5% prumerge_plus", "87.5% + first beam caption", "87.5% + selector (ACCM)",
                "87.5% + oracle caption", "93.75% + selector (ACCM)", "75% prumerge_plus"):
        assert 0.0 <= table[key]["accuracy"] <= 1.0 and table[key]["mflops_per_item"] > 0
    # the caption model + selector cost shows up in ACCM's FLOPs, not in the oracle row's
    assert table["87.5% + selector (ACCM)"]["mflops_per_item"] > table["87.5% + oracle caption"]["mflops_per_item"]

    # the shipped-layout folders load through the captioner tier's entry point
    from actors.accm import ACCMCaptioner

    accm = ACCMCaptioner.from_pretrained(str(work / "captioner"), str(work / "selector"))
    assert accm.captioner.config.beams == 3
