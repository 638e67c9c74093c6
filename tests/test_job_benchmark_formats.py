"""The job on ScienceQA, SEED, TextVQA, VQAv2 and Flickr30k files as they ship (``--task``), end to end on one
local Ray with the first world's small models: every input row gives one output row, per-row errors for bad
records, and ``summary["benchmarks"][task]`` equal to the task module's ``aggregate`` over the output rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import tasks
from tests.benchmark_files import (
    HF_IMAGE,
    OPTION,
    SHORT,
    approx,
    hf_image,
    image_dir,
    jsonl,
    run_job_rows,
    scored,
)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------------
# ScienceQA, SEED, TextVQA, VQAv2, Flickr30k: they run, one row per input row, headline = aggregate(rows)


def _scienceqa(root: Path, photos: dict[str, bytes]) -> tuple[list[str], int, dict[str, str]]:
    names = sorted(photos)
    items, problems = [], {}
    for i in range(3):
        pid = str(100 + i)
        text = "Context: N/A\nWhich colour is shown?\nA. red\nB. green\nC. blue"
        item = {"id": pid, "conversations": [{"from": "human", "value": f"<image>\n{text}"},
                                             {"from": "gpt", "value": "A"}]}
        if i < 2:
            item["image"] = names[i]
        items.append(item)  # item 2 is text-only: a per-row error
        problems[pid] = {"answer": i % 3, "choices": ["red", "green", "blue"], "subject": "natural science",
                         "grade": "grade3", "image": "image.png" if i < 2 else None}
    (root / "ann").mkdir(parents=True)
    (root / "ann" / "problems.json").write_text(json.dumps(problems))
    (root / "ann" / "pid_splits.json").write_text(json.dumps({"test": list(problems), "val": []}))
    (root / "llava_test_CQM-A.json").write_text(json.dumps(items))
    image_dir(root / "images", photos)
    args = ["--input", str(root / "llava_test_CQM-A.json"), "--annotations", str(root / "ann"),
            "--image-root", str(root / "images")]
    from pipeline.tasks.scienceqa import TEXT_ONLY

    return args, 3, {"102": TEXT_ONLY}


def _seed(root: Path, photos: dict[str, bytes]) -> tuple[list[str], int, dict[str, str]]:
    names = sorted(photos)
    lines, questions = [], []
    for i in range(3):
        qid = str(200 + i)
        text = f"How many objects are there?\nA. one\nB. two\nC. three\nD. four\n{OPTION}"
        lines.append({"question_id": int(qid), "image": names[i], "text": text, "category": "x"})
        questions.append({"question_id": qid, "answer": "ABC"[i], "question_type_id": 5 if i else 1,
                          "data_type": "image"})
    jsonl(root / "llava-seed-bench.jsonl", lines)
    (root / "SEED-Bench.json").write_text(json.dumps(
        {"questions": questions, "question_type": {"Scene Understanding": 1, "Instances Counting": 5}}))
    image_dir(root / "images", photos)
    return (["--input", str(root / "llava-seed-bench.jsonl"), "--annotations", str(root / "SEED-Bench.json"),
             "--image-root", str(root / "images")], 3, {})


def _textvqa(root: Path, photos: dict[str, bytes]) -> tuple[list[str], int, dict[str, str]]:
    names = sorted(photos)
    lines, data = [], []
    for i in range(3):
        image_id = names[i].rsplit(".", 1)[0]
        question = f"what is written on sign {i}?"
        lines.append({"question_id": image_id, "image": names[i],
                      "text": f"{question}\nReference OCR token: STOP, {i}\n{SHORT}"})
        data.append({"question_id": 34600 + i, "image_id": image_id, "question": question,
                     "answers": ["stop"] * 7 + ["yes"] * 3})
    jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", lines)
    (root / "ann").mkdir()
    (root / "ann" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    image_dir(root / "images", photos)
    return (["--input", str(root / "llava_textvqa_val_v051_ocr.jsonl"),
             "--annotations", str(root / "ann" / "TextVQA_0.5.1_val.json"), "--image-root", str(root / "images")],
            3, {})


def _vqav2(root: Path, photos: dict[str, bytes]) -> tuple[list[str], int, dict[str, str]]:
    names = sorted(photos)
    lines, anns = [], []
    for i in range(3):
        lines.append({"question_id": 5000 + i, "image": names[i], "text": f"What colour is the sky?\n{SHORT}"})
        anns.append({"question_id": 5000 + i, "image_id": 70 + i, "answer_type": ("other", "yes/no")[i % 2],
                     "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(["blue"] * 6 + ["yes"] * 4)]})
    jsonl(root / "llava_vqav2_val.jsonl", lines)
    (root / "ann").mkdir()
    (root / "ann" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    image_dir(root / "images", photos)
    return (["--input", str(root / "llava_vqav2_val.jsonl"), "--annotations", str(root / "ann"),
             "--image-root", str(root / "images")], 3, {})


def _flickr30k(root: Path, photos: dict[str, bytes]) -> tuple[list[str], int, dict[str, str]]:
    names = sorted(photos)
    records = [{"image": hf_image(photos[n], n), "caption": [f"a colourful picture number {i} {w}"
                                                              for w in ("outdoors", "indoors", "today", "here", "now")],
                "img_id": str(1000 + i), "filename": n} for i, n in enumerate(names[:3])]
    schema = pa.schema([("image", HF_IMAGE), ("caption", pa.list_(pa.string())), ("img_id", pa.string()),
                        ("filename", pa.string())])
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), root / "test-00000-of-00001.parquet")
    return (["--input", str(root / "test-00000-of-00001.parquet"), "--input-format", "hf-parquet"], 3, {})


BUILDERS = {"scienceqa": _scienceqa, "seed": _seed, "textvqa": _textvqa, "vqav2": _vqav2, "flickr30k": _flickr30k}


@pytest.mark.parametrize("task", list(BUILDERS))
def test_other_formats_run_and_headline_is_the_aggregate(ray_session, photos, tmp_path, task) -> None:
    root = tmp_path / task
    root.mkdir()
    args, n_in, errors = BUILDERS[task](root, photos)
    summary, rows = run_job_rows(tmp_path / "out", "--task", task, *args, "--max-new-tokens", "16")  # time
    assert len(rows) == n_in == summary["items"]
    assert len({r["id"] for r in rows}) == n_in
    for r in rows:
        if r["id"] in errors:
            assert r["error"] == errors[r["id"]] and r["prediction"] is None
        else:
            assert r["error"] is None and isinstance(r["prediction"], str), (r["id"], r["error"])
    assert summary["errors"] == len(errors)
    module = tasks.get(task)
    got = summary["benchmarks"][task]
    assert module.HEADLINE in got and got["rows"] == n_in - len(errors)
    kwargs = {}
    if task == "flickr30k":
        assert got["tokenizer"] in ("ptb", "python-ptb-like") and got["cider"] is not None
        kwargs = {"tokenizer": "python"} if got["tokenizer"] == "python-ptb-like" else {}
    want = module.aggregate(scored(rows), **kwargs)
    approx(got[module.HEADLINE], want[module.HEADLINE])
    approx({k: v for k, v in got.items() if k != "rows"}, want)
    if task in ("textvqa", "vqav2", "seed", "scienceqa"):
        assert all(r["answers"] for r in rows)  # the ground truth joined from --annotations
