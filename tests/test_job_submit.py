"""`ray job submit` against a private local head (infra/local/start.sh), once; stop.sh leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shapes
from pipeline.schema import INPUT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
VENV_PY = REPO / ".venv/bin/python"
pytestmark = pytest.mark.slow


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip('"')
    return env


def _dashboard_log_tail(local: Path) -> str:
    """The head's dashboard logs, for the diagnosis of a failed submit (the job API lives there)."""
    logs = sorted((local / "ray").glob("session_*/logs/dashboard*.log"))
    return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:] for p in logs)


def test_ray_job_submit_to_local_head(s3_server, tmp_bucket, tmp_path) -> None:
    from actors.tiny import build_tiny_llava
    from pipeline.storage import resolve

    fs, _ = resolve(f"s3://{tmp_bucket}")
    rows = [shapes.item_row(shapes.make_item(3, "test", i)) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), f"{tmp_bucket}/in/a.parquet", filesystem=fs)
    build_tiny_llava(tmp_path / "lvlm", vision_layers=2, text_layers=1)

    local = Path(tempfile.mkdtemp(prefix="accm-jt-", dir="/tmp"))  # short: Ray's AF_UNIX paths are <= 107 bytes
    # The head inherits this process's AWS_* (the test's moto server), so its workers reach the bucket.
    env = dict(os.environ, ACCM_LOCAL_DIR=str(local), ACCM_NUM_CPUS="2", ACCM_WITH_S3="0")
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(["bash", str(REPO / "infra/local/start.sh")], env=env, capture_output=True, text=True,
                           timeout=300)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        env.update(_env_file(local / "env.sh"))
        submit = subprocess.run(
            [str(REPO / ".venv/bin/ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--working-dir", ".",
             "--runtime-env-json",
             '{"excludes": [".venv", ".git", "runs", "out", "tmp", "models", "data", "**/__pycache__"]}',
             "--", str(VENV_PY), "jobs/caption_dataset.py", "--input", f"s3://{tmp_bucket}/in",
             "--output", f"s3://{tmp_bucket}/out", "--lvlm", str(tmp_path / "lvlm"), "--method", "random",
             "--keep-tokens", "16", "--batch-size", "4"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:] + _dashboard_log_tail(local)
        assert "succeeded" in submit.stdout + submit.stderr
        out = pq.read_table(f"{tmp_bucket}/out/a.parquet", filesystem=fs)
        assert out.column("id").to_pylist() == [r["id"] for r in rows]
        assert set(out.column("error").to_pylist()) == {None}, out.column("error").to_pylist()[:1]
        assert set(out.column("keep_tokens").to_pylist()) == {16}
    finally:
        stop = subprocess.run(["bash", str(REPO / "infra/local/stop.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
    assert stop.returncode == 0, stop.stderr
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(local / "ray")], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the local cluster still running: {left}"
    shutil.rmtree(local, ignore_errors=True)


def test_failed_start_stops_what_it_started(tmp_path) -> None:
    """A head that cannot start (injected: a `ray` that exits at once; nothing else is faked) makes
    start.sh fail *and* stop the real moto server it had already started, so the next start is not
    refused as "running" (make demo once failed that way)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "moto_server"):
        (venv / "bin" / name).symlink_to(REPO / ".venv/bin" / name)
    (venv / "bin/ray").write_text("#!/bin/sh\necho 'injected: head cannot start' >&2\nexit 3\n")
    (venv / "bin/ray").chmod(0o755)
    local = Path(tempfile.mkdtemp(prefix="accm-fail-", dir="/tmp"))
    env = {**os.environ, "ACCM_LOCAL_DIR": str(local), "VENV": str(venv), "ACCM_NUM_CPUS": "1"}
    try:
        start = subprocess.run(["bash", str(REPO / "infra/local/start.sh")], env=env, capture_output=True,
                               text=True, timeout=120)
        assert start.returncode != 0
        assert "ray head exited" in start.stderr and "stopped" in start.stderr
        assert not (local / "pids").exists()
        assert (local / "logs/ray-head.log").exists()  # kept for the diagnosis
        deadline = time.time() + 10
        while time.time() < deadline and subprocess.run(["pgrep", "-f", f"moto_server.*{local}"]).returncode == 0:
            time.sleep(0.2)
        moto = subprocess.run(["pgrep", "-af", "moto_server"], capture_output=True, text=True).stdout
        port = _env_file(local / "env.sh")["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
        assert f"-p {port}" not in moto
    finally:
        subprocess.run(["bash", str(REPO / "infra/local/stop.sh")], env=env, capture_output=True)
        shutil.rmtree(local, ignore_errors=True)
