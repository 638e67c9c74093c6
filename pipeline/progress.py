"""Durable progress: the job's write path, run by Ray workers, with a bounded loss on a crash.

    ... -> score -> write_parts (CPU tasks): every --part-rows finished rows of a shard become one part
       ``<output>/_parts/<shard>/part-<digest of its ids>.parquet``, one atomic object (one upload on S3,
       write-then-rename locally). A part is durable the moment it exists as a readable Parquet file (an
       interrupted S3 write can leave an empty object, which readers ignore: ``read_part``).
    driver (tiny records only: shard, rows) -> finalize_shard (a Ray task per complete shard): the parts
       joined with the shard's passthrough columns in input order -> ``<output>/<shard>`` (atomic), then
       the marker ``<output>/_done/<shard>.json`` with the shard's summary statistics, then the parts go.

Why it is exact: a part's name is a digest of the ids it holds, so a retried write task rewrites the same
object (no duplicate); a resumed run reads the ids of the parts left by a crashed one (``plan_shard``) and
skips those rows before decoding them; finalize keeps each planned id once and refuses a shard with a
missing row. The marker is written last and proves a complete output file, so ``--resume`` trusts it on any
store with single-object atomicity (S3 and compatibles, local disks).

The bound: a ``kill -9`` at any moment loses only rows not yet in a part: the rows inside the stages (at
most ``(captioner + LVLM actors) x 2 x BLOCK_BATCHES x --batch-size`` in the actor pools: two tasks in flight
per actor, blocks cut to ``graph.BLOCK_BATCHES`` (4) batches), fewer than ``--part-rows`` answered rows per shard in the writer's current batch, and answered blocks
queued for the writer (none while the models are the bottleneck; otherwise capped by Ray Data's
backpressure). ``--resume`` redoes exactly the rows that are in no part.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import resume, retry, sources, storage
from pipeline.schema import NOT_PASSED_THROUGH, OUTPUT_COLUMNS, output_schema
from pipeline.summary import table_stats

log = logging.getLogger("accm.progress")

PARTS_DIR = "_parts"
SHARD = "_shard"
SETTING = "_setting"
LEDGER_PREFIX = "accm-retries-"


def parts_prefix(output: str, rel: str) -> str:
    return resume.join(output, f"{PARTS_DIR}/{rel}")


def part_url(output: str, rel: str, ids: list[str]) -> str:
    """The part holding exactly ``ids``: the same rows always land in the same object."""
    return resume.join(parts_prefix(output, rel), f"part-{resume.ids_digest(sorted(ids))}.parquet")


# ----------------------------------------------------------------------------------------------------
# retry counts: each worker reports what it retried to one named actor per run


def report_retries(run_id: str | None) -> None:
    """Send this process's retry counts since the last report to the run's ledger (fire and forget)."""
    counts = retry.take_retry_counts()
    if not counts or not run_id:
        return
    try:
        import ray

        ray.get_actor(LEDGER_PREFIX + run_id).add.remote(counts)
    except Exception as exc:  # noqa: BLE001 - counting must never fail a batch
        log.debug("retry counts not reported: %s", exc)


class RetryLedger:
    """Retry counts per operation, summed over every worker of a run (a ``ray.remote`` actor)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        self.counts = retry.merge_counts(self.counts, counts)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


# ----------------------------------------------------------------------------------------------------
# planning one shard (a Ray task: the driver only gets small facts and object refs back)


def count_rows(url: str, source: sources.Source) -> int:
    """Rows of one input file (``--limit``): a Parquet footer, or the file's records counted."""
    if source.native:
        fs, path = storage.resolve(url, s3_endpoint=source.s3_endpoint)
        return storage.call("read footer", url, pq.read_metadata, path, filesystem=fs).num_rows
    return sources.read_table(url, source, columns=["id"]).num_rows


def plan_shard(url: str, rel: str, source: sources.Source, limit: int | None, outputs: dict[str, str],
               resume_run: bool, budget_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(facts, row filter) of one input shard for each output (``outputs``: label -> output root).

    facts: schema, rows, planned rows, their digest, and per label ``done`` (a matching marker: its stats)
    or ``committed`` (rows already in parts). The row filter (kept in the object store, read by the decode
    stage and the sweep's captioner tier): ``keep`` (``--limit``'s cut of this shard, else None),
    ``skip_all`` (ids in parts for every pending label) and ``skip`` per label.
    """
    from pipeline.schema import SchemaError, validate_input_schema, validate_unique_ids

    retry.set_budget(budget_s)
    s3_endpoint = source.s3_endpoint
    _, path = storage.resolve(url, s3_endpoint=s3_endpoint)
    try:
        schema = sources.read_schema(url, source)
        validate_input_schema(schema, url)
        output_schema(schema)
        ids = sources.read_table(url, source, columns=["id"]).column("id").to_pylist()
        validate_unique_ids(ids, url)
    except (SchemaError, ValueError) as exc:  # a malformed file, or ground truth the task cannot read
        return {"rel": rel, "error": storage.redact(str(exc))}, {}
    except storage.StorageError as exc:
        if isinstance(exc, retry.RetryBudgetExceeded):
            raise
        return {"rel": rel, "error": f"{storage.redact(url)}: not a readable {source.kind} file: {exc}"}, {}
    num_rows = len(ids)
    planned = ids if limit is None else ids[:limit]
    keep = set(planned) if len(planned) < num_rows else None
    facts: dict[str, Any] = {"rel": rel, "url": url, "path": path, "schema": schema, "num_rows": num_rows,
                             "planned": len(planned), "digest": resume.ids_digest(planned), "labels": {}}
    skip: dict[str, set[str]] = {}
    for label, output in outputs.items():
        marker = resume.read_marker(output, rel, s3_endpoint) if resume_run else None
        if marker is not None and marker.rows == len(planned) and marker.ids_digest == facts["digest"]:
            facts["labels"][label] = {"done": True, "stats": marker.stats}
            storage.delete_prefix(parts_prefix(output, rel), s3_endpoint=s3_endpoint)  # a finalize cut short
            continue
        resume.clear_marker(output, rel, s3_endpoint)
        in_parts: set[str] = set()
        if resume_run:
            wanted = keep if keep is not None else set(planned)
            for part in storage.list_files(parts_prefix(output, rel), s3_endpoint=s3_endpoint):
                if not part.endswith(".parquet"):
                    continue
                if (table := read_part(part, s3_endpoint, columns=["id"])) is None:
                    storage.delete(part, s3_endpoint=s3_endpoint)  # not durable work: its rows are redone
                    continue
                in_parts.update(i for i in table.column("id").to_pylist() if i in wanted)
        else:
            storage.delete_prefix(parts_prefix(output, rel), s3_endpoint=s3_endpoint)
        skip[label] = in_parts
        facts["labels"][label] = {"done": False, "committed": len(in_parts)}
    pending = list(skip.values())
    skip_all = set.intersection(*pending) if pending else set()
    facts["retries"] = retry.take_retry_counts()
    return facts, {"keep": keep, "skip_all": skip_all, "skip": skip}


def read_part(url: str, s3_endpoint: str | None, columns: list[str] | None = None) -> pa.Table | None:
    """The part at ``url``, or None (with a warning) when it is not a readable Parquet file.

    pyarrow's S3 writer commits whatever it holds when its stream is closed, and a ``with`` block closes it
    on any exception: a write task interrupted between opening its upload and writing to it (a Ray task
    cancelled when a run fails, say) leaves a 0-byte object under the part's name. Such a part holds no
    finished rows, so readers treat it as absent. The bytes are fetched first, so transient store faults
    are still retried (``storage.read_bytes``) and only the content decides.
    """
    data = storage.read_bytes(url, action="read part", s3_endpoint=s3_endpoint)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except pa.ArrowException as exc:
        log.warning("ignoring unreadable part %s (%d bytes: %s); its rows are redone", storage.redact(url),
                    len(data), storage.redact(str(exc)))
        return None


# ----------------------------------------------------------------------------------------------------
# the writer stage (Ray Data CPU tasks)


def write_parts(batch: pa.Table, *, outputs: dict[str, str], s3_endpoint: str | None, budget_s: float,
                run_id: str | None) -> pa.Table:
    """Scored rows -> one part per (label, shard) in this batch; returns one small record per part."""
    retry.set_budget(budget_s)
    keep = ["id", *(c for c in OUTPUT_COLUMNS if c in batch.column_names)]
    shards = batch.column(SHARD).to_pylist()
    labels = batch.column(SETTING).to_pylist() if SETTING in batch.column_names else [None] * batch.num_rows
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(labels, shards, strict=True)):
        groups.setdefault((key[0] or "", key[1]), []).append(i)
    records = []
    for (label, rel), rows in groups.items():
        part = batch.take(pa.array(rows)).select(keep)
        ids = part.column("id").to_pylist()
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        resume.write_atomic(part_url(outputs[label], rel, ids), sink.getvalue().to_pybytes(), s3_endpoint)
        busy = sum(v or 0.0 for name in ("latency_captioner_s", "latency_lvlm_s") if name in part.column_names
                   for v in part.column(name).to_pylist())
        records.append({"label": label, "shard": rel, "rows": len(ids), "busy_s": busy})
    report_retries(run_id)
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


RECORD_SCHEMA = pa.schema([("label", pa.string()), ("shard", pa.string()), ("rows", pa.int64()),
                           ("busy_s", pa.float64())])


# ----------------------------------------------------------------------------------------------------
# finalizing one shard (a Ray task)


def finalize_shard(facts: dict[str, Any], output: str, const: dict[str, Any], s3_endpoint: str | None,
                   budget_s: float) -> dict[str, Any]:
    """Parts + passthrough columns -> ``<output>/<rel>`` in input order, then its marker; returns the
    shard's stats and this task's retry counts. Idempotent: run again after a crash, it writes the same."""
    retry.set_budget(budget_s)
    rel, planned = facts["rel"], facts["planned"]
    results: dict[str, dict[str, Any]] = {}
    for part in storage.list_files(parts_prefix(output, rel), s3_endpoint=s3_endpoint):
        if not part.endswith(".parquet"):
            continue
        table = read_part(part, s3_endpoint)  # an unreadable part: its rows are missing, and --resume redoes them
        for row in (table.to_pylist() if table is not None else []):
            results.setdefault(row["id"], row)  # a row is in one part; keep the first if ever twice
    columns = [c for c in facts["schema"].names if c not in NOT_PASSED_THROUGH]
    passthrough = sources.read_table(facts["url"], facts["source"], columns=columns).slice(0, planned)
    rows, missing = [], []
    for row in passthrough.to_pylist():
        result = results.get(row["id"])
        if result is None:
            missing.append(row["id"])
            continue
        row.update({k: result.get(k) for k in OUTPUT_COLUMNS if k in result})
        row.update(const)
        rows.append(row)
    if missing:
        raise RuntimeError(f"{rel}: {len(missing)} planned rows are in no part (first: {missing[:3]}); "
                           "the shard has no marker, rerun with --resume")
    table = pa.Table.from_pylist(rows, schema=output_schema(facts["schema"]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    resume.write_atomic(resume.output_url(output, rel), sink.getvalue().to_pybytes(), s3_endpoint)
    stats = table_stats(table)
    resume.write_marker(output, rel, planned, facts["digest"], const["run_id"], stats, s3_endpoint)
    storage.delete_prefix(parts_prefix(output, rel), s3_endpoint=s3_endpoint)
    return {"label_output": output, "rel": rel, "stats": stats, "retries": retry.take_retry_counts()}

