"""``--lvlm-tp``: the main job with DeepSpeed tensor parallelism in the LVLM tier, at tp=1 on CPU.

At tp=1 the LVLM actor goes through ``actors.tp.init_rank`` (gloo) + ``shard_model(model, 1)``, where
DeepSpeed splits nothing, so the job must give exactly the answers of a run without the flag, row by row.

tp > 1 is NOT tested here: it needs several GPUs on one node and NCCL, and the development machines have
no GPU. Its path (rank 0 = the Ray Data actor holding N GPUs, N-1 ``LVLMRank`` helper actors pinned to
its node, same inputs to every rank) is in ``pipeline/stages.py``; its config checks are in
tests/test_job_config.py.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shapes
from pipeline.schema import INPUT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _main_job():
    spec = importlib.util.spec_from_file_location("caption_dataset", ROOT / "jobs/caption_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _worker_logs(ray) -> str:
    session = ray._private.worker._global_node.get_session_dir_path()
    text = []
    for path in glob.glob(os.path.join(session, "logs", "worker-*")):
        with open(path, errors="replace") as f:
            text.append(f.read())
    return "\n".join(text)


def _stable(row: dict) -> dict:
    """PIL's decode errors name a BytesIO object by its address: the same error, a different text."""
    return {**row, "error": re.sub(r" at 0x[0-9a-f]+", "", row["error"]) if row["error"] else None}


def test_lvlm_tp1_gives_the_plain_models_answers(ray_session, tmp_path) -> None:
    from actors.tiny import build_tiny_llava

    build_tiny_llava(tmp_path / "lvlm", vision_layers=2, text_layers=2)
    rows = [shapes.item_row(shapes.make_item(3, "test", i)) for i in range(7)]
    rows[2] = dict(rows[2], image=rows[2]["image"][:40])  # truncated PNG: an error row both ways
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=INPUT_SCHEMA), src / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:], schema=INPUT_SCHEMA), src / "b.parquet")
    job = _main_job()
    common = ["--input", str(src), "--lvlm", str(tmp_path / "lvlm"), "--method", "fastv", "--fastv-layer", "1",
              "--prune-rate", "0.5", "--batch-size", "3", "--model-cache", str(tmp_path / "cache")]
    assert job.main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert job.main([*common, "--output", str(tmp_path / "tp1"), "--lvlm-tp", "1"]) == 0
    assert "DeepSpeed tp=1" in _worker_logs(ray_session), "the LVLM tier did not go through shard_model"

    columns = ["id", "prediction", "error", "score", "keep_tokens", "flops_total", "flops_llm_prefill"]
    for name in ("a.parquet", "b.parquet"):
        plain = pq.read_table(tmp_path / "plain" / name, columns=columns).to_pylist()
        tp1 = pq.read_table(tmp_path / "tp1" / name, columns=columns).to_pylist()
        assert [r["id"] for r in plain] == [r["id"] for r in tp1]
        for a, b in zip(plain, tp1, strict=True):
            assert _stable(a) == _stable(b), (a, b)
    out = [r for name in ("a.parquet", "b.parquet") for r in pq.read_table(tmp_path / "tp1" / name).to_pylist()]
    errors = [r for r in out if r["error"]]
    assert len(errors) == 1 and errors[0]["error"].startswith("image:")
    assert all(isinstance(r["prediction"], str) for r in out if not r["error"])  # 6 real answers compared
