"""The main job end to end on real Ray (2 CPUs) and a real moto S3 server, with tiny random models.

Random weights make predictions meaningless; what is checked is the pipeline: one output row per input
row with the declared schema, per-row errors for bad input, pruned FLOPs below the reference, and an
exact ``--resume`` after a kill -9 of the driver and its Ray at 25%, 50% and 90% of the rows that redoes
only the rows that were in no durable part (faults come from ``tests/faults.py``, never from the job).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shapes
from pipeline.config import JobConfig
from pipeline.schema import FLOPS_COLUMNS, INPUT_SCHEMA, output_schema

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _rows(start: int, n: int) -> list[dict]:
    return [shapes.item_row(shapes.make_item(7, "test", i)) for i in range(start, start + n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bad_rows() -> tuple[list[dict], dict[str, str | None]]:
    """Rows covering bad and odd-but-valid input; expected error prefix per id (None = answered)."""
    from PIL import Image

    base = _rows(100, 1)[0]
    good_png = base["image"]
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(cmyk, format="JPEG")
    gif = io.BytesIO()
    frames = [Image.new("P", (40, 30), i) for i in range(3)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    cases = {
        "null-image": (None, "image:"),
        "empty-image": (b"", "image:"),
        "garbage-image": (b"definitely not a png", "image:"),
        "truncated-image": (good_png[: len(good_png) // 2], "image:"),
        "too-many-pixels": (_png(Image.new("RGB", (300, 300))), "image:"),
        "null-question": (good_png, "question:"),
        "blank-question": (good_png, "question:"),
        "cmyk-jpeg": (cmyk.getvalue(), None),
        "rgba": (_png(Image.new("RGBA", (64, 64), (1, 2, 3, 4))), None),
        "gray-1x1": (_png(Image.new("L", (1, 1), 128)), None),
        "animated-gif": (gif.getvalue(), None),
        "fine": (good_png, None),
    }
    rows = []
    for id_, (image, _) in cases.items():
        row = dict(base, id=id_, image=image)
        if id_ == "null-question":
            row["question"] = None
        if id_ == "blank-question":
            row["question"] = "   "
        rows.append(row)
    return rows, {k: v for k, (_, v) in cases.items()}


def _write(path: Path | str, rows: list[dict], fs=None) -> None:
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    else:
        pq.write_table(table, path, filesystem=fs)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from actors.captioner import build_caption_model
    from actors.selector import build_selector
    from actors.tiny import build_tiny_llava, build_tokenizer

    root = tmp_path_factory.mktemp("job-models")
    build_tiny_llava(root / "lvlm", vision_layers=2, text_layers=1)
    build_caption_model(build_tokenizer(), feature_dim=64, hidden=32, decoder_layers=1, mapper_layers=1,
                        max_caption_tokens=4).save_pretrained(root / "captioner")
    build_selector(text_hidden=32, text_layers=1, projection_dim=32, layers=1).save_pretrained(root / "selector")
    return {name: str(root / name) for name in ("lvlm", "captioner", "selector")}


@pytest.fixture(scope="module")
def death_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("actor-death")


def test_end_to_end_through_s3_with_bad_rows(ray_session, s3_server, tmp_bucket, models, tmp_path,
                                             death_dir) -> None:
    """Also: the LVLM actor dies in its first batch (tests/faults.py); Ray restarts it and retries, counts exact."""
    from pipeline.graph import run_job
    from pipeline.storage import resolve
    from tests.faults import DyingLVLMTier

    fs, _ = resolve(f"s3://{tmp_bucket}")
    for f in sorted(os.listdir(models["lvlm"])):  # the model comes from object storage too
        s3_server.client.upload_file(os.path.join(models["lvlm"], f), tmp_bucket, f"models/lvlm/{f}")
    good = [_rows(0, 3), _rows(3, 2)]
    bad, expected = _bad_rows()
    for i, rows in enumerate([*good, bad]):
        _write(f"{tmp_bucket}/in/part-{i:05d}.parquet", rows, fs)

    cfg = JobConfig(input=f"s3://{tmp_bucket}/in", output=f"s3://{tmp_bucket}/out", method="prumerge_plus",
                    prune_rate=0.875, lvlm=f"s3://{tmp_bucket}/models/lvlm", batch_size=4,
                    max_pixels=200 * 200, model_cache=str(tmp_path / "cache")).validate()
    DyingLVLMTier.death_dir = str(death_dir)
    summary = run_job(cfg, lvlm=DyingLVLMTier)
    assert (death_dir / "lvlm-actor-died").exists()  # the actor did die mid-run
    assert not [k for k in s3_server.keys(tmp_bucket, "out/") if "/_parts/" in k]  # parts go once finalized

    keys = s3_server.keys(tmp_bucket, "out/")
    for i in range(3):
        assert f"out/part-{i:05d}.parquet" in keys and f"out/_done/part-{i:05d}.parquet.json" in keys
    assert "out/summary.json" in keys
    n_in = sum(len(r) for r in good) + len(bad)
    assert summary["items"] == summary["rows_processed"] == n_in
    assert summary["errors"] == sum(v is not None for v in expected.values())

    want_schema = output_schema(INPUT_SCHEMA)
    for i, rows in enumerate([*good, bad]):
        table = pq.read_table(f"{tmp_bucket}/out/part-{i:05d}.parquet", filesystem=fs)
        assert table.schema.equals(want_schema, check_metadata=False)
        assert table.column("id").to_pylist() == [r["id"] for r in rows]  # one row per input row, in order
    ok = pq.read_table(f"{tmp_bucket}/out/part-00000.parquet", filesystem=fs).to_pylist()
    for row in ok:
        assert row["error"] is None and isinstance(row["prediction"], str)
        assert row["keep_tokens"] == 8 and row["visual_tokens_total"] == 64
        assert 0 < row["flops_total"] < row["flops_reference_total"]
        named = [c for c in FLOPS_COLUMNS if c not in ("flops_total", "flops_reference_total")]
        assert sum(row[c] for c in named) == pytest.approx(row["flops_total"], rel=1e-9)  # the parts add up
        assert row["flops_projector"] > 0 and row["flops_pruner"] > 0
        assert row["conv"] == "llava_hf" and row["answer_suffix"] == "" and row["text_pick"] is None
        assert row["score"] is not None and row["method"] == "prumerge_plus"
        assert row["caption"] is None and row["run_id"] == summary["run_id"]
    out_bad = {r["id"]: r for r in pq.read_table(f"{tmp_bucket}/out/part-00002.parquet", filesystem=fs).to_pylist()}
    for id_, prefix in expected.items():
        if prefix is None:
            assert out_bad[id_]["error"] is None and out_bad[id_]["prediction"] is not None, id_
        else:
            assert out_bad[id_]["error"].startswith(prefix), (id_, out_bad[id_]["error"])
            assert out_bad[id_]["prediction"] is None and out_bad[id_]["question_type"] == "color"
    written = json.loads(s3_server.client.get_object(Bucket=tmp_bucket, Key="out/summary.json")["Body"].read())
    assert written["items"] == n_in and written["flops_saving"] > 0
    answered = [r for i in range(3) for r in pq.read_table(f"{tmp_bucket}/out/part-{i:05d}.parquet",
                                                           filesystem=fs).to_pylist() if r["error"] is None]
    assert all(r["prefill_tokens"] > 0 and r["prefill_pad_tokens"] >= 0 for r in answered)
    pad, real = sum(r["prefill_pad_tokens"] for r in answered), sum(r["prefill_tokens"] for r in answered)
    assert written["padding_fraction"] == pytest.approx(pad / (pad + real))


def test_kill_9_at_25_50_90_percent_then_resume_redoes_only_rows_in_no_part(ray_session, models, tmp_path) -> None:
    """kill -9 of the job's whole process tree (driver + its local Ray) once 25% of the rows are durable,
    then of a --resume run at 50%, then of another at 90%; a last --resume finishes. Each kill loses at most
    the stated bound of finished work (rows the LVLM had answered that are in no part: --part-rows + 2 x
    BLOCK_BATCHES x --batch-size per LVLM actor, pipeline.progress) and nothing durable; no resumed run answers a row that was
    durable when it started; the last one processes exactly the rows in no part or marked shard; the output
    holds every row exactly once, in input order."""
    from pipeline.config import parse_args
    from pipeline.graph import BLOCK_BATCHES, run_job
    from tests.faults import answered_ids, durable_ids, kill_at

    src, out = tmp_path / "in", tmp_path / "out"
    shards = [_rows(20 + 16 * i, 16) for i in range(5)]
    for i, rows in enumerate(shards):
        _write(src / f"s{i}.parquet", rows)
    n = sum(len(s) for s in shards)
    part_rows, batch_size = 4, 1  # blocks of BLOCK_BATCHES x 1 = 4 rows: parts land a few rows at a time
    args = ["--input", str(src), "--output", str(out), "--method", "accm", "--lvlm", models["lvlm"],
            "--captioner", models["captioner"], "--selector", models["selector"], "--batch-size", str(batch_size),
            "--part-rows", str(part_rows)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    before: set[str] = set()
    for k, fraction in enumerate((0.25, 0.5, 0.9)):
        answered = tmp_path / f"answered-{k}"
        answered.mkdir()
        code, seen = kill_at([sys.executable, str(REPO / "tests/faults.py"), "--slow-lvlm-s", "0.15",
                              "--answered-dir", str(answered), *args, *(["--resume"] if k else [])],
                             out, int(fraction * n), env=env)
        assert code == -signal.SIGKILL, f"the job was not killed (exit {code})"
        durable = durable_ids(out)
        assert before <= durable and len(durable) >= seen >= fraction * n  # nothing durable was lost
        assert len(durable) < n  # the kill came before the end
        assert not answered_ids(answered) & before  # a resumed run redid nothing that was durable
        lost = answered_ids(answered) - durable
        assert len(lost) <= part_rows + 2 * BLOCK_BATCHES * batch_size, sorted(lost)
        before = durable

    summary = run_job(parse_args([*args, "--resume"]))
    assert summary["rows_processed"] == n - len(before)  # redone: only what was in no part
    assert summary["items"] == n and summary["errors"] == 0
    table = pa.concat_tables([pq.read_table(out / f"s{i}.parquet") for i in range(len(shards))])
    for i, rows in enumerate(shards):  # one row per input row, in input order, per shard
        assert pq.read_table(out / f"s{i}.parquet").column("id").to_pylist() == [r["id"] for r in rows]
    rows = table.to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    assert all(r["caption"] is not None and r["caption_candidates"] and r["selector_probs"] for r in rows)
    assert len(os.listdir(out / "_done")) == len(shards)
    assert not list(out.glob("_parts/**/*.parquet"))  # every part went into its shard's file
