"""After a run: the task's official aggregate(s) over its output, and LLaVA's answer file (``--export``).

Both need every finished row at once (MME's accuracy+ pairs two questions of an image, MMVP pairs two
questions, CIDEr weighs n-grams by the whole test set), so they run in one Ray task that reads only the
columns they need from the output files; the driver gets a small dict back.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow.parquet as pq

from pipeline import resume, storage, tasks

LLAVA_ANSWERS = "llava_answers.jsonl"
_BASE_COLUMNS = ("id", "question", "prediction", "answers", "score", "error", "question_type")


def _rows(output: str, rels: list[str], columns: list[str], s3_endpoint: str | None):
    for rel in rels:
        url = resume.output_url(output, rel)
        fs, path = storage.resolve(url, s3_endpoint=s3_endpoint)
        names = storage.call("read schema", url, pq.read_schema, path, filesystem=fs).names
        table = storage.call("read", url, pq.read_table, path, filesystem=fs,
                             columns=[c for c in columns if c in names])
        yield from table.to_pylist()


def evaluate_run(cfg: Any, shards: list[Any], output: str | None = None) -> dict[str, Any]:
    """``{"benchmarks": {task: its official aggregate(s)}, "exports": {task: LLaVA answer file}}`` of one
    output (default ``cfg.output``; a sweep: one setting's), one Ray task per task over its shards."""
    import ray

    by_task: dict[str, list[str]] = {}
    for shard in shards:
        if shard.source.task:
            by_task.setdefault(shard.source.task, []).append(shard.rel)
    if not by_task:
        return {"benchmarks": {}, "exports": {}}
    model_id = cfg.lvlm.rstrip("/").rsplit("/", 1)[-1]
    remote = ray.remote(evaluate_output).options(num_cpus=0.5, max_retries=2)
    refs = {task: remote.remote(output or cfg.output, rels, task, cfg.export, model_id, str(cfg.run_id),
                                cfg.s3_endpoint) for task, rels in by_task.items()}
    done = {task: ray.get(ref) for task, ref in refs.items()}
    return {"benchmarks": {t: d["task"] for t, d in done.items()},
            "exports": {t: d["export"] for t, d in done.items() if d["export"]}}


def evaluate_output(output: str, rels: list[str], task: str | None, export: str | None, model_id: str,
                    run_id: str, s3_endpoint: str | None) -> dict[str, Any]:
    """{"task": the task's aggregate or None, "export": the answer file's URL or None} for ``output``'s
    shards ``rels`` (the answer file goes beside them)."""
    module = tasks.get(task) if task else None
    columns = list(_BASE_COLUMNS) + ([f.name for f in module.EXTRA_FIELDS] if module else [])
    scored, answers = [], []
    qid_field = getattr(module, "LLAVA_QUESTION_ID", "question_id")
    for row in _rows(output, rels, columns, s3_endpoint):
        if export:
            answers.append(llava_answer(row, model_id, run_id, qid_field))
        if row.get("error") is None and row.get("prediction") is not None:
            scored.append(row)
    out: dict[str, Any] = {"task": None, "export": None}
    if module is not None:
        out["task"] = {"rows": len(scored), **module.aggregate(scored)}
    if export:
        folder = rels[0].rsplit("/", 1)[0] + "/" if "/" in rels[0] else ""
        url = resume.join(output, folder + LLAVA_ANSWERS)
        text = "".join(json.dumps(a) + "\n" for a in answers)
        resume.write_atomic(url, text.encode(), s3_endpoint)
        out["export"] = storage.redact(url)
    return out


def llava_answer(row: dict[str, Any], model_id: str, run_id: str, qid_field: str = "question_id") -> dict[str, Any]:
    """One line of LLaVA's answer file (``llava/eval/model_vqa_loader.py``: question_id, prompt, text,
    answer_id, model_id, metadata), so that the benchmarks' own conversion and scoring scripts read our
    output unchanged. ``question_id`` keeps the benchmark's type; an errored row answers ''."""
    qid = row.get(qid_field, row.get("question_id", row.get("index", row["id"])))
    answer_id = hashlib.sha1(f"{run_id}/{row['id']}".encode()).hexdigest()[:22]
    return {"question_id": qid, "prompt": row.get("question"), "text": row.get("prediction") or "",
            "answer_id": answer_id, "model_id": model_id, "metadata": {"error": row.get("error")}}
