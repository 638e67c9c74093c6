"""``--lvlm-tp``: the main job with DeepSpeed tensor parallelism in the LVLM tier, on CPU (gloo).

At tp=1 the LVLM actor goes through ``actors.tp.init_rank`` + ``shard_model(model, 1)``, where DeepSpeed
splits nothing. At tp=2 the replica is the Ray Data actor (rank 0) plus one ``LVLMRank`` helper actor; AutoTP
splits every decoder Linear over the two CPU ranks and gloo all-reduces. Both must give the answers of a run
without the flag, row by row. Only the NCCL collectives of tp > 1 on GPUs cannot run here.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shapes
from pipeline.schema import INPUT_SCHEMA
from tests.jobs import V1_MODEL_ARGS, load_job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _main_job():
    return load_job("caption_dataset")


@pytest.fixture(scope="module")
def helper_death_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tp-helper-death")


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


def test_lvlm_tp1_and_tp2_give_the_plain_models_answers(ray_session, tmp_path, helper_death_dir) -> None:
    """tp=2 also survives its helper rank dying in the first batch: rank 0 exits at once (a broken group would
    block in NCCL or fail every later batch in gloo), Ray Data restarts the replica and retries the batch, and
    every answer still matches the plain model's."""
    # the shipped Shapes-VQA LVLM: trained, so its greedy answers are not near-ties that a different
    # all-reduce order could flip (a random-init model's are: tp=2 changed one of its answers)
    lvlm = ROOT / "models/shapes/lvlm"
    rows = [shapes.item_row(shapes.make_item(3, "test", i)) for i in range(7)]
    rows[2] = dict(rows[2], image=rows[2]["image"][:40])  # truncated PNG: an error row both ways
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=INPUT_SCHEMA), src / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:], schema=INPUT_SCHEMA), src / "b.parquet")
    job = _main_job()
    common = ["--input", str(src), "--lvlm", str(lvlm), "--method", "fastv", "--fastv-layer", "1",
              "--prune-rate", "0.5", "--batch-size", "3", "--model-cache", str(tmp_path / "cache")]
    assert job.main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert job.main([*common, "--output", str(tmp_path / "tp1"), "--lvlm-tp", "1"]) == 0
    assert "DeepSpeed tp=1" in _worker_logs(ray_session), "the LVLM tier did not go through shard_model"
    from pipeline.config import parse_args
    from pipeline.graph import run_job
    from tests.faults import DyingHelperLVLMTier, DyingRank

    DyingRank.death_dir = str(helper_death_dir)  # its first generate exits the helper's process mid-batch
    run_job(parse_args([*common, "--output", str(tmp_path / "tp2"), "--lvlm-tp", "2"]), lvlm=DyingHelperLVLMTier)
    logs = _worker_logs(ray_session)
    assert "LVLM tier (tp rank 1)" in logs and "DeepSpeed tp=2" in logs, "no second rank sharded the model"
    assert "tensor-parallel replica of 2 rank(s) ready" in logs
    assert (helper_death_dir / "tp-helper-died").exists()  # the helper did die mid-run

    columns = ["id", "prediction", "error", "score", "keep_tokens", "flops_total", "flops_llm_prefill"]
    for run in ("tp1", "tp2"):
        for name in ("a.parquet", "b.parquet"):
            plain = pq.read_table(tmp_path / "plain" / name, columns=columns).to_pylist()
            split = pq.read_table(tmp_path / run / name, columns=columns).to_pylist()
            assert [r["id"] for r in plain] == [r["id"] for r in split]
            for a, b in zip(plain, split, strict=True):
                assert _stable(a) == _stable(b), (run, a, b)
        out = [r for name in ("a.parquet", "b.parquet") for r in pq.read_table(tmp_path / run / name).to_pylist()]
        errors = [r for r in out if r["error"]]
        assert len(errors) == 1 and errors[0]["error"].startswith("image:")
        assert all(isinstance(r["prediction"], str) for r in out if not r["error"])  # 6 real answers compared
    assert "helper rank died" in logs and "restarting the replica" in logs


def test_accm_through_tp2_gives_the_plain_models_captions_and_answers(ray_session, tmp_path) -> None:
    """ACCM (shipped caption model + selector) with the caption spliced into the sharded LLM: same captions,
    answers and FLOPs as without --lvlm-tp, row by row."""
    rows = [shapes.item_row(shapes.make_item(5, "test", i)) for i in range(8)]
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), src / "a.parquet")
    job = _main_job()
    common = ["--input", str(src), "--method", "accm", "--prune-rate", "0.875", "--batch-size", "4",
              "--model-cache", str(tmp_path / "cache"),
              # the first world's trained models (greedy answers far from ties that an all-reduce order could flip)
              *V1_MODEL_ARGS]
    assert job.main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert job.main([*common, "--output", str(tmp_path / "tp2"), "--lvlm-tp", "2"]) == 0
    columns = ["id", "caption", "prediction", "error", "score", "flops_total", "flops_llm_prefill"]
    plain = pq.read_table(tmp_path / "plain" / "a.parquet", columns=columns).to_pylist()
    split = pq.read_table(tmp_path / "tp2" / "a.parquet", columns=columns).to_pylist()
    assert plain == split
    assert all(r["error"] is None for r in plain) and any(r["caption"] for r in plain)
