"""The job on every benchmark format as it ships (``--task``), end to end on one local Ray with the shipped
small models: files built here in each format with a few real-sized images (640x480 JPEG/PNG photos).

Predictions of the small model on these photos are arbitrary: what is checked is the plumbing. Every input
row gives one output row, per-row errors for bad records, the benchmark's ids kept, and
``summary["benchmarks"][task]`` equal to the official metric recomputed here from the output rows (POPE's,
MME's and MMVP's by hand, the others through the task module's ``aggregate`` over the output Parquet).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.benchmark_files import HF_IMAGE, SHORT, approx, hf_image, image_dir, jsonl, run_job_rows

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------------
# POPE


POPE_OBJECTS = ("dog", "car", "tree", "person", "chair", "cup")


def _pope_files(root: Path, photos: dict[str, bytes], names: list[str] | None = None) -> dict[str, Path]:
    """LLaVA's question file (no labels, numbered on) + coco_pope_<category>.json label files (ids restart)."""
    names = names or sorted(photos)
    questions, labels = [], defaultdict(list)
    qid = 0
    for c, category in enumerate(("adversarial", "popular", "random")):
        for k in range(2):
            qid += 1
            image = names[(c + k) % len(names)]
            text = f"Is there a {POPE_OBJECTS[(2 * c + k) % len(POPE_OBJECTS)]} in the image?"
            label = "yes" if k == 0 else "no"
            questions.append({"question_id": qid, "image": image, "text": f"{text}\n{SHORT}", "category": category})
            labels[category].append({"question_id": k + 1, "image": image, "text": text, "label": label})
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for category, recs in labels.items():
        jsonl(ann / f"coco_pope_{category}.json", recs)
    return {"questions": jsonl(root / "llava_pope_test.jsonl", questions), "annotations": ann,
            "images": image_dir(root / "images", photos, names)}


def _pope_says_no(prediction: str) -> bool:
    """eval_pope.py L11-20, written out again: first sentence, commas dropped, split on ' ', No/not/no."""
    text = prediction.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return any(w in ("No", "not", "no") for w in words)


def _pope_expected(rows: list[dict]) -> dict:
    def div(a, b):
        return None if b == 0 else a / b

    def pct(v):
        return None if v is None else 100.0 * v

    per = {}
    by_cat: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r in rows:
        by_cat[r["question_type"]].append((not _pope_says_no(r["prediction"]), r["answers"][0] != "no"))
    for cat, pairs in sorted(by_cat.items()):
        tp = sum(1 for p, g in pairs if p and g)
        fp = sum(1 for p, g in pairs if p and not g)
        tn = sum(1 for p, g in pairs if not p and not g)
        fn = sum(1 for p, g in pairs if not p and g)
        precision, recall = div(tp, tp + fp), div(tp, tp + fn)
        f1 = None if precision is None or recall is None else div(2 * precision * recall, precision + recall)
        per[cat] = {"n": len(pairs), "TP": tp, "FP": fp, "TN": tn, "FN": fn,
                    "accuracy_pct": pct(div(tp + tn, len(pairs))), "precision_pct": pct(precision),
                    "recall_pct": pct(recall), "f1_pct": pct(f1),
                    "yes_ratio_pct": pct(div(sum(p for p, _ in pairs), len(pairs)))}
    out = {"per_category": per, "n": len(rows), "rows": len(rows)}
    for key in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        values = [m[f"{key}_pct"] for m in per.values()]
        out[f"{key}_mean_pct"] = None if None in values else sum(values) / len(values)
    return out


def test_pope_llava_jsonl_metrics_ids_and_answer_file(ray_session, photos, tmp_path) -> None:
    files = _pope_files(tmp_path / "pope", photos)
    questions = [json.loads(line) for line in files["questions"].read_text().splitlines()]
    out = tmp_path / "out"
    summary, rows = run_job_rows(out, "--task", "pope", "--input", str(files["questions"]),
                         "--annotations", str(files["annotations"]), "--image-root", str(files["images"]),
                         "--export", "llava-answers")
    assert len(rows) == len(questions) == summary["items"] and summary["errors"] == 0
    by_qid = {r["question_id"]: r for r in rows}
    assert sorted(by_qid) == [q["question_id"] for q in questions]  # one output row per input row
    labels = {}
    for f in files["annotations"].iterdir():
        for rec in map(json.loads, f.read_text().splitlines()):
            labels[(f.stem.removeprefix("coco_pope_"), rec["image"], rec["text"])] = rec["label"]
    for q in questions:
        r = by_qid[q["question_id"]]
        assert isinstance(r["question_id"], int) and r["question_type"] == q["category"]
        assert r["image_name"] == q["image"] and r["error"] is None and isinstance(r["prediction"], str)
        assert r["image_uri"] == f"{files['images']}/{q['image']}"  # where the image was read from
        # the label comes from the category's own label file (its ids restart at 1: matched by image+question)
        assert r["answers"] == [labels[(q["category"], q["image"], q["text"].split("\n")[0])]]
    approx(summary["benchmarks"]["pope"], _pope_expected(rows))

    lines = [json.loads(line) for line in (out / "llava_answers.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    assert summary["exports"]["pope"].endswith("llava_answers.jsonl")
    for line in lines:
        assert set(line) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        r = by_qid[line["question_id"]]
        assert isinstance(line["question_id"], int) and line["text"] == r["prediction"]
        assert line["prompt"] == r["question"] and line["metadata"] == {"error": None}
    assert len({line["answer_id"] for line in lines}) == len(lines)


def test_limit_on_a_jsonl_input_processes_that_many_rows(ray_session, photos, tmp_path) -> None:
    files = _pope_files(tmp_path / "pope", photos)
    summary, rows = run_job_rows(tmp_path / "out", "--task", "pope", "--input", str(files["questions"]),
                         "--annotations", str(files["annotations"]), "--image-root", str(files["images"]),
                         "--limit", "3")
    assert summary["rows_processed"] == summary["items"] == len(rows) == 3
    assert sorted(r["question_id"] for r in rows) == [1, 2, 3]
    assert summary["benchmarks"]["pope"]["n"] == 3


def test_a_6000x6000_jpeg_in_a_pope_file_is_answered(ray_session, tmp_path) -> None:
    from PIL import Image

    side = 6000
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    big = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                    np.full((side, side), 90, np.uint8)], axis=-1)
    root = tmp_path / "pope"
    (root / "images").mkdir(parents=True)
    Image.fromarray(big, "RGB").save(root / "images" / "big.jpg", quality=80)
    del big
    q = jsonl(root / "llava_pope_test.jsonl",
               [{"question_id": 1, "image": "big.jpg", "text": f"Is there a dog in the image?\n{SHORT}",
                 "category": "random", "label": "no"}])
    summary, rows = run_job_rows(tmp_path / "out", "--task", "pope", "--input", str(q),
                         "--image-root", str(root / "images"))
    assert len(rows) == 1
    assert rows[0]["error"] is None and isinstance(rows[0]["prediction"], str), rows[0]["error"]
    assert summary["errors"] == 0


def test_pope_inputs_in_s3(ray_session, s3_server, tmp_bucket, photos, tmp_path) -> None:
    files = _pope_files(tmp_path / "pope", photos)
    for path in sorted((tmp_path / "pope").rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), tmp_bucket, f"pope/{path.relative_to(tmp_path / 'pope')}")
    base = f"s3://{tmp_bucket}/pope"
    summary, _ = run_job_rows(f"s3://{tmp_bucket}/out", "--task", "pope", "--input", f"{base}/llava_pope_test.jsonl",
                      "--annotations", f"{base}/annotations", "--image-root", f"{base}/images",
                      "--export", "llava-answers")
    keys = s3_server.keys(tmp_bucket, "out/")
    assert {"out/llava_pope_test.parquet", "out/summary.json", "out/llava_answers.jsonl"} <= set(keys)
    from pipeline.storage import resolve

    fs, path = resolve(f"s3://{tmp_bucket}/out/llava_pope_test.parquet")
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    n = len(files["questions"].read_text().splitlines())
    assert len(rows) == summary["items"] == n and summary["errors"] == 0
    assert all(r["answers"] in (["yes"], ["no"]) for r in rows)  # labels read from the bucket
    approx(summary["benchmarks"]["pope"], _pope_expected(rows))
    answers = s3_server.client.get_object(Bucket=tmp_bucket, Key="out/llava_answers.jsonl")["Body"].read()
    assert len(answers.decode().splitlines()) == n


# ----------------------------------------------------------------------------------------------------
# MME (hf-parquet), acc+ over the image pairs



def _mme_parse(prediction: str) -> str:
    prefix = prediction.strip().lower()[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def test_mme_hf_parquet_acc_plus_over_image_pairs(ray_session, photos, tmp_path) -> None:
    names = sorted(photos)
    records = []
    for category, objects in (("existence", ("dog", "car")), ("commonsense_reasoning", ("umbrella", "coat"))):
        for i, name in enumerate(names[:2]):
            qid = f"{category}/{name}"
            for obj, answer in ((objects[i], "Yes"), (objects[1 - i], "No")):
                records.append({"question_id": qid, "image": hf_image(photos[name], name),
                                "question": f"Is there a {obj} in this image? Please answer yes or no.",
                                "answer": answer, "category": category})
    schema = pa.schema([("question_id", pa.string()), ("image", HF_IMAGE), ("question", pa.string()),
                        ("answer", pa.string()), ("category", pa.string())])
    src = tmp_path / "mme" / "test-00000-of-00001.parquet"
    src.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), src)
    summary, rows = run_job_rows(tmp_path / "out", "--task", "mme", "--input", str(src))  # format detected
    assert len(rows) == len(records) == summary["items"] and summary["errors"] == 0
    got = summary["benchmarks"]["mme"]
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        assert r["question"].endswith(SHORT) and "Please answer yes or no" not in r["question"]
        images[r["question_type"]][r["question_id"]].append(_mme_parse(r["prediction"]) == r["answers"][0].lower())
    total = 0.0
    for category, pairs in images.items():
        assert all(len(p) == 2 for p in pairs.values())
        acc = sum(sum(p) for p in pairs.values()) / (2 * len(pairs))
        acc_plus = sum(all(p) for p in pairs.values()) / len(pairs)
        sub = got["subtasks"][category]
        assert sub["acc_plus_pct"] == pytest.approx(100 * acc_plus) and sub["acc_pct"] == pytest.approx(100 * acc)
        assert sub["images"] == 2 and sub["questions"] == 4 and sub["incomplete_images"] == 0
        assert sub["score"] == pytest.approx(100 * (acc + acc_plus))
        total += sub["score"]
    assert got["perception"] == pytest.approx(got["subtasks"]["existence"]["score"])
    assert got["cognition"] == pytest.approx(got["subtasks"]["commonsense_reasoning"]["score"])
    assert got["total"] == pytest.approx(total)


# ----------------------------------------------------------------------------------------------------
# MMBench (TSV, base64 images)


def test_mmbench_tsv_accuracy_and_per_row_errors(ray_session, photos, tmp_path) -> None:
    from pipeline.tasks import mmbench

    b64 = [base64.b64encode(photos[n]).decode() for n in sorted(photos)]
    fields = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    records = [
        {"index": "0", "question": "What is the main colour?", "hint": "", "A": "red", "B": "green",
         "C": "blue", "D": "", "answer": "A", "category": "color", "l2-category": "perception", "image": b64[0]},
        {"index": "1", "question": "How many circles?", "hint": "Count them.", "A": "one", "B": "two",
         "C": "three", "D": "four", "answer": "C", "category": "count", "l2-category": "perception",
         "image": b64[1]},
        {"index": "2", "question": "Is it outdoors?", "hint": "", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "B", "category": "scene", "l2-category": "reasoning", "image": b64[2]},
        {"index": "3", "question": "Which shape?", "hint": "", "A": "circle", "B": "square", "C": "", "D": "",
         "answer": "A", "category": "shape", "l2-category": "perception", "image": "@@not base64!!"},
        {"index": "4", "question": "Which side?", "hint": "", "A": "left", "B": "right", "C": "", "D": "",
         "answer": "D", "category": "position", "l2-category": "reasoning", "image": b64[3]},
        {"index": "1000001", "question": "How many circles?", "hint": "Count them.", "A": "two", "B": "three",
         "C": "four", "D": "one", "answer": "B", "category": "count", "l2-category": "perception",
         "image": b64[1]},
    ]
    src = tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"
    src.parent.mkdir()
    with src.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        writer.writeheader()
        writer.writerows(records)
    summary, rows = run_job_rows(tmp_path / "out", "--task", "mmbench", "--input", str(src))
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == sorted(r["index"] for r in records) and summary["items"] == len(records)
    assert by_id["3"]["error"].startswith("image:") and by_id["3"]["prediction"] is None
    want_letter_error = mmbench.to_row(dict(records[4]), "mmbench-tsv", None, 4)["input_error"]
    assert by_id["4"]["error"] == want_letter_error and by_id["4"]["prediction"] is None
    assert summary["errors"] == 2
    answered = [by_id[i] for i in ("0", "1", "2", "1000001")]
    scores = []
    for r in answered:
        assert r["error"] is None and isinstance(r["prediction"], str)
        options = [r[k] for k in "ABCD" if r[k] is not None]
        assert r["answers"][1:] == options
        hit = mmbench.extract(r["prediction"], options) == r["answers"][0]
        assert r["score"] == float(hit)
        scores.append(hit)
    assert by_id["0"]["D"] is None and by_id["1000001"]["index"] == 1000001
    got = summary["benchmarks"]["mmbench"]
    assert got["accuracy"] == pytest.approx(100 * sum(scores) / len(scores)) and got["n"] == 4
    assert got["circular_copies"] == 1


# ----------------------------------------------------------------------------------------------------
# MMVP (CSV + 'MMVP Images/{i}.jpg')


def test_mmvp_csv_pair_accuracy_and_missing_image(ray_session, photos, tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "mmvp"
    (root / "MMVP Images").mkdir(parents=True)
    names = sorted(photos)
    for i in range(1, 6):  # image 6 is missing: pair (5, 6) cannot count
        Image.open(io.BytesIO(photos[names[(i - 1) % 4]])).convert("RGB").save(root / "MMVP Images" / f"{i}.jpg")
    src = root / "Questions.csv"
    with src.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        for i in range(1, 7):
            writer.writerow([i, f"Is the object facing left? ({i})", "(a) Yes (b) No", "(a)" if i % 2 else "(b)"])
    summary, rows = run_job_rows(tmp_path / "out", "--task", "mmvp", "--input", str(src), "--image-root", str(root))
    by_index = {r["index"]: r for r in rows}
    assert sorted(by_index) == list(range(1, 7)) and summary["items"] == 6
    assert by_index[6]["error"].startswith("image_uri: cannot read"), by_index[6]["error"]
    assert by_index[6]["score"] is None and summary["errors"] == 1
    pairs = defaultdict(list)
    for r in rows:
        if r["error"] is None:
            assert isinstance(r["prediction"], str) and r["score"] in (0.0, 1.0)
            pairs[(r["index"] - 1) // 2].append(r["score"] == 1.0)
    complete = [p for p in pairs.values() if len(p) == 2]
    assert len(complete) == 2
    got = summary["benchmarks"]["mmvp"]
    assert got["pairs"] == 2 and got["incomplete_pairs"] == 1
    assert got["pair_accuracy"] == pytest.approx(100 * sum(all(p) for p in complete) / 2)


# ----------------------------------------------------------------------------------------------------
# GQA (an unanswered question: unscored, not an error)


def test_gqa_question_without_ground_truth_is_unscored(ray_session, photos, tmp_path) -> None:
    root = tmp_path / "gqa"
    names = sorted(photos)
    qids = ["20968379", "201307251", "05515938", "99999999"]
    questions = [{"question_id": q, "image": names[i], "text": f"What colour is the ball {i}?\n{SHORT}"}
                 for i, q in enumerate(qids)]
    src = jsonl(root / "llava_gqa_testdev_balanced.jsonl", questions)
    image_dir(root, photos)
    truth = {q: {"answer": ans, "imageId": names[i].split(".")[0], "isBalanced": True,
                 "types": {"structural": st, "semantic": "attr", "detailed": "x"}}
             for i, (q, ans, st) in enumerate(zip(qids[:3], ["red", "yes", "no"], ["query", "verify", "verify"],
                                                  strict=True))}
    (root / "ann").mkdir()
    (root / "ann" / "testdev_balanced_questions.json").write_text(json.dumps(truth))
    summary, rows = run_job_rows(tmp_path / "out", "--task", "gqa", "--input", str(src), "--image-root", str(root),
                         "--annotations", str(root / "ann" / "testdev_balanced_questions.json"))
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == sorted(qids) and all(isinstance(r["question_id"], str) for r in rows)
    lone = by_id["99999999"]
    assert lone["answers"] is None and lone["score"] is None and lone["error"] is None
    assert isinstance(lone["prediction"], str)
    assert summary["errors"] == 0 and summary["items"] == 4 and summary["scored_items"] == 3
    for q in qids[:3]:
        r = by_id[q]
        assert r["answers"] == [truth[q]["answer"]]
        assert r["score"] == float(r["prediction"].strip().rstrip(".").lower() == truth[q]["answer"])
    got = summary["benchmarks"]["gqa"]
    assert got["n"] == 3
    assert got["accuracy_pct"] == pytest.approx(100 * sum(by_id[q]["score"] for q in qids[:3]) / 3)
