"""The Ray Data graph of the main job and its driver (SPEC §4).

    read_parquet (pending shards) -> decode/validate (CPU tasks)
      -> captioner tier (actor pool: vision tower once, pruner, ACCM caption model + selector)
      -> LVLM tier (actor pool: projector + pruned LLM + caption splice)
      -> scoring (CPU tasks) -> driver: one Parquet file per input shard + completion marker

Why the driver writes: every input shard maps to exactly one output file with the same relative name,
written whole and then marked done (``pipeline.resume``). That makes file names deterministic and
``--resume`` exact (a shard is either marked and complete, or redone), which Ray's block-wise
``write_parquet`` cannot promise per input file. The rows reaching the driver are small (no image, no
features), and each shard's rows are released as soon as it is written.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import resume, storage
from pipeline.config import JobConfig
from pipeline.schema import (
    NOT_PASSED_THROUGH,
    OUTPUT_COLUMNS,
    SchemaError,
    output_schema,
    validate_input_schema,
    validate_unique_ids,
)
from pipeline.stages import CaptionerTier, LVLMTier, decode_batch, score_batch
from pipeline.summary import format_table, summarize, to_json

log = logging.getLogger("accm.job")

CRASH_ENV = "ACCM_JOB_CRASH_AFTER_SHARDS"  # test hook: kill -9 the job's process group after N shards


@dataclass
class Shard:
    """One input Parquet file and the rows of it this run covers."""

    url: str  # as listed (keeps the scheme)
    path: str  # inside the pyarrow filesystem
    rel: str  # relative name under --input = output file name under --output
    schema: pa.Schema
    num_rows: int
    ids: list[str]  # planned rows, input order (--limit may cut the last shard)


# ----------------------------------------------------------------------------------------------------
# planning (driver only, before anything is written)


def plan_shards(cfg: JobConfig) -> tuple[Any, list[Shard]]:
    """List and validate the input shards; a broken shard stops the job here, naming the file."""
    fs, root = storage.resolve(cfg.input, s3_endpoint=cfg.s3_endpoint)
    urls = storage.list_parquet_files(cfg.input, s3_endpoint=cfg.s3_endpoint)
    if not urls:
        raise FileNotFoundError(f"no *.parquet files under --input {storage.redact(cfg.input)}")
    shards, budget = [], cfg.limit
    for url in urls:
        _, path = storage.resolve(url, s3_endpoint=cfg.s3_endpoint)
        rel = path[len(root):].lstrip("/") if path != root else os.path.basename(path)
        try:
            schema = pq.read_schema(path, filesystem=fs)
            validate_input_schema(schema, url)
            output_schema(schema)
            ids = pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
        except SchemaError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable footer, truncated file, ...
            raise SchemaError(f"{storage.redact(url)}: not a readable Parquet file: {type(exc).__name__}: "
                              f"{storage.redact(exc)}") from None
        validate_unique_ids(ids, url)
        num_rows = len(ids)
        if budget is not None:
            ids, budget = ids[:budget], max(0, budget - len(ids))
        shards.append(Shard(url, path, rel, schema, num_rows, ids))
    return fs, shards


def effective_method(cfg: JobConfig) -> JobConfig:
    """The embedded default runs accm; without its checkpoints it says so loudly and runs prumerge_plus."""
    if cfg.method != "accm" or not cfg.accm_fallback:
        return cfg
    missing = [f"{what} {storage.redact(url)}" for what, url in (("caption model", cfg.captioner),
                                                                 ("selector", cfg.selector))
               if not url or not storage.exists(url, s3_endpoint=cfg.s3_endpoint)]
    if importlib.util.find_spec("actors.accm") is None:
        missing.append("module actors.accm")
    if not missing:
        return cfg
    banner = "!" * 100
    log.warning("%s\nACCM is not available (%s missing): FALLING BACK to method prumerge_plus at the same "
                "pruning rate. Pass --method accm to get per-row errors instead.\n%s",
                banner, ", ".join(missing), banner)
    return replace(cfg, method="prumerge_plus")


# ----------------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class Resources:
    task_cpus: float
    captioner: dict[str, Any]
    lvlm: dict[str, Any]


def _autoscaled(gpus: float | None, default_gpus: float, resource: str) -> dict[str, Any]:
    """One tier's actor request on an autoscaling cluster (see tier_resources)."""
    gpus = default_gpus if gpus is None else gpus
    req: dict[str, Any] = {"num_cpus": 1.0}
    if gpus:
        req["num_gpus"] = gpus
        if resource:
            req["resources"] = {resource: gpus}
    return req


def tier_resources(cfg: JobConfig, cluster: dict[str, float], node_gpus: list[float] | None = None) -> Resources:
    """Per-actor requests that fit the cluster: fractional CPUs on small machines (a 2-CPU Ray Data graph
    deadlocks when actors hold every CPU the read task needs), GPUs and tier resources only if present.

    ``--lvlm-tp N`` (N > 1): an LVLM replica is one actor holding N GPUs (Ray places an actor's resources
    on one node, so the N ranks share a node); a cluster whose nodes (``node_gpus``: GPUs per alive node, if
    known) all have fewer than N is refused here rather than left pending forever. Without GPUs the ranks
    are CPU processes over gloo (pipeline.tp_replica.start_tp_replica).

    ``--autoscale``: the nodes alive now say nothing about the nodes to come, so each actor asks for 1 CPU,
    its tier's GPUs (explicit or the GPU defaults) and its tier resource at one unit per GPU, as the node
    types in infra/ carry them; the autoscaler then launches what the requests need.
    """
    tp = cfg.lvlm_tp or 1
    if cfg.autoscale:
        return Resources(
            task_cpus=1.0,
            captioner=_autoscaled(cfg.captioner_gpus, 0.5, cfg.captioner_resource),
            lvlm=_autoscaled(cfg.lvlm_gpus, float(tp), cfg.lvlm_resource),
        )
    cpus = float(cluster.get("CPU", 1.0))
    has_gpu = float(cluster.get("GPU", 0.0)) > 0
    if tp > 1:
        if not has_gpu or cfg.lvlm_gpus == 0:
            log.warning("--lvlm-tp %d without GPUs: %d CPU ranks over gloo per LVLM replica (DeepSpeed AutoTP on "
                        "CPU; it splits memory, it does not speed up a small model)", tp, tp)
        elif node_gpus and max(node_gpus) < tp:
            raise ValueError(f"--lvlm-tp {tp} needs {tp} GPUs on one node; the largest node of this cluster "
                             f"has {max(node_gpus):g}")
    n_actors = cfg.captioner_actors[1] + cfg.lvlm_actors[1]
    actor_cpus = 1.0 if cpus - 1 >= n_actors else max(0.05, round((cpus - 1) / n_actors, 3) or 0.25 / n_actors)
    task_cpus = 1.0 if cpus >= 2 else 0.5

    def tier(gpus: float | None, default_gpus: float, resource: str, max_actors: int) -> dict[str, Any]:
        req: dict[str, Any] = {"num_cpus": actor_cpus}
        if gpus is None:  # auto: GPUs where there are some
            gpus = default_gpus if has_gpu else 0.0
        if gpus and not has_gpu:
            log.warning("%s: %.2f GPUs requested but the cluster has none: running on CPU", resource, gpus)
            gpus = 0.0
        if gpus and has_gpu:
            req["num_gpus"] = gpus
        if cluster.get(resource, 0) > 0:
            req["resources"] = {resource: min(1.0, cluster[resource] / max_actors)}
        return req

    return Resources(
        task_cpus=task_cpus,
        captioner=tier(cfg.captioner_gpus, 0.5, cfg.captioner_resource, cfg.captioner_actors[1]),
        lvlm=tier(cfg.lvlm_gpus, float(tp), cfg.lvlm_resource, cfg.lvlm_actors[1]),
    )


def node_gpus(ray) -> list[float]:
    """GPUs of each alive node of the connected cluster."""
    return [float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


# ----------------------------------------------------------------------------------------------------
# the graph


def build_dataset(cfg: JobConfig, fs: Any, shards: list[Shard], res: Resources, *, captioner: type = CaptionerTier,
                  captioner_kwargs: dict[str, Any] | None = None):
    """Ray Data graph over ``shards`` (lazy): rows with ``_shard``, ``id`` and the output columns.

    ``captioner``: the captioner-tier actor class (the shared-encoding sweep passes ``SweepCaptionerTier``
    and its extra constructor arguments in ``captioner_kwargs``)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    limited = any(len(s.ids) < s.num_rows for s in shards)
    ds = ray.data.read_parquet([s.path for s in shards], filesystem=fs, include_paths=True,
                               num_cpus=res.task_cpus)
    ds = ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=res.task_cpus,
        fn_kwargs={"max_pixels": cfg.max_pixels, "s3_endpoint": cfg.s3_endpoint,
                   "shard_names": {s.path: s.rel for s in shards},
                   "allowed_ids": {s.rel: set(s.ids) for s in shards} if limited else None},
    )
    cap_gpus = res.captioner.get("num_gpus", 0.0)
    ds = ds.map_batches(
        captioner, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(min_size=cfg.captioner_actors[0], max_size=cfg.captioner_actors[1]),
        fn_constructor_kwargs={"cfg": cfg, "num_gpus": cap_gpus, **(captioner_kwargs or {})}, **res.captioner,
    )
    lvlm_gpus = res.lvlm.get("num_gpus", 0.0)
    ds = ds.map_batches(
        LVLMTier, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(min_size=cfg.lvlm_actors[0], max_size=cfg.lvlm_actors[1]),
        fn_constructor_kwargs={"cfg": cfg, "num_gpus": lvlm_gpus}, **res.lvlm,
    )
    return ds.map_batches(score_batch, batch_format="pyarrow", num_cpus=res.task_cpus)


# ----------------------------------------------------------------------------------------------------
# writing


def write_shard(cfg: JobConfig, fs: Any, shard: Shard, results: dict[str, dict[str, Any]],
                const: dict[str, Any]) -> int:
    """Join results with the shard's passthrough columns, write ``<output>/<rel>``, then its marker."""
    columns = [c for c in shard.schema.names if c not in NOT_PASSED_THROUGH]
    passthrough = pq.read_table(shard.path, filesystem=fs, columns=columns)
    if len(shard.ids) < shard.num_rows:
        passthrough = passthrough.slice(0, len(shard.ids))
    schema = output_schema(shard.schema)
    rows = []
    for row in passthrough.to_pylist():
        result = results[row["id"]]
        row.update({k: result.get(k) for k in OUTPUT_COLUMNS if k in result})
        row.update(const)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    resume.write_atomic(resume.output_url(cfg.output, shard.rel), sink.getvalue().to_pybytes(), cfg.s3_endpoint)
    resume.write_marker(cfg.output, shard.rel, shard.ids, const["run_id"], cfg.s3_endpoint)
    return table.num_rows


def _maybe_crash(written: int) -> None:
    after = os.environ.get(CRASH_ENV)
    if after and written >= int(after):
        log.error("%s=%s: killing this job's process group with SIGKILL (test hook)", CRASH_ENV, after)
        logging.shutdown()
        os.killpg(os.getpgid(0), signal.SIGKILL)


def read_outputs(cfg: JobConfig, shards: list[Shard]) -> pa.Table:
    fs, _ = storage.resolve(cfg.output, s3_endpoint=cfg.s3_endpoint)
    tables = []
    for shard in shards:
        _, path = storage.resolve(resume.output_url(cfg.output, shard.rel), s3_endpoint=cfg.s3_endpoint)
        t = pq.read_table(path, filesystem=fs)
        keep = [c for c in t.column_names if c in OUTPUT_COLUMNS or c in ("id", "question_type")]
        tables.append(t.select(keep))
    return pa.concat_tables(tables, promote_options="default")


# ----------------------------------------------------------------------------------------------------
# the job


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the pipeline on the current Ray (``ray.init`` done by the caller); returns the summary."""
    import ray

    t0 = time.perf_counter()
    run_id = cfg.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if not storage.exists(cfg.lvlm, s3_endpoint=cfg.s3_endpoint):
        raise FileNotFoundError(f"LVLM model not found at --lvlm {storage.redact(cfg.lvlm)} (the shipped small "
                                "models are built by jobs/train_lvlm.py into models/shapes/)")
    cfg = replace(effective_method(cfg), run_id=run_id)
    check_fastv_layer(cfg)
    fs, shards = plan_shards(cfg)
    const = output_constants(cfg)

    pending = []
    for shard in shards:
        if cfg.resume and resume.is_done(cfg.output, shard.rel, shard.ids, cfg.s3_endpoint):
            continue
        resume.clear_marker(cfg.output, shard.rel, cfg.s3_endpoint)
        pending.append(shard)
    skipped = len(shards) - len(pending)
    log.info("run %s: %d shards, %d rows planned; %d shards already done (--resume), %d to process",
             run_id, len(shards), sum(len(s.ids) for s in shards), skipped, len(pending))

    written = processed = 0
    for shard in [s for s in pending if not s.ids]:  # nothing to compute: empty output with the schema
        write_shard(cfg, fs, shard, {}, const)
        written += 1
    work = [s for s in pending if s.ids]
    if work:
        res = tier_resources(cfg, ray.cluster_resources(), node_gpus(ray))
        log.info("resources: tasks %.2f CPU; captioner actors %s x %s; LVLM actors %s x %s", res.task_cpus,
                 cfg.captioner_actors, res.captioner, cfg.lvlm_actors, res.lvlm)
        ds = build_dataset(cfg, fs, work, res)
        by_rel = {s.rel: s for s in work}
        results: dict[str, dict[str, dict[str, Any]]] = {s.rel: {} for s in work}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                rel = row.pop("_shard")
                bucket = results.get(rel)
                if bucket is None:
                    log.warning("row %r of unknown or finished shard %r ignored", row.get("id"), rel)
                    continue
                bucket[row["id"]] = row  # a retried batch cannot duplicate a row
                shard = by_rel[rel]
                if len(bucket) == len(shard.ids):
                    processed += write_shard(cfg, fs, shard, bucket, const)
                    del results[rel]
                    written += 1
                    log.info("shard %s: %d rows written (%d/%d shards)", rel, len(shard.ids), written, len(pending))
                    _maybe_crash(written)
        if results:
            missing = {rel: len(by_rel[rel].ids) - len(rows) for rel, rows in results.items()}
            raise RuntimeError(f"rows missing after the graph finished (shard: count): {missing}; "
                               "those shards have no marker, rerun with --resume")

    wall = time.perf_counter() - t0
    run = {"run_id": run_id, "method": cfg.method, "keep_tokens": cfg.keep_tokens, "prune_rate": cfg.prune_rate,
           "input": storage.redact(cfg.input), "output": storage.redact(cfg.output), "shards": len(shards),
           "shards_skipped": skipped, "rows_processed": processed, "wall_s": wall}
    return write_summary(cfg, shards, run)


def check_fastv_layer(cfg: JobConfig) -> None:
    """Refuse a ``--fastv-layer`` at or past the LLM's depth before anything runs (it would prune nothing).
    Reads only the checkpoint's ``config.json``."""
    import json

    if cfg.method != "fastv":
        return
    try:
        config = json.loads(storage.read_bytes(resume.join(cfg.lvlm, "config.json"), s3_endpoint=cfg.s3_endpoint))
    except Exception as exc:  # noqa: BLE001 - the LVLM tier reports an unreadable model itself
        log.warning("could not read the LVLM's config.json to check --fastv-layer: %s", exc)
        return
    depth = (config.get("text_config") or {}).get("num_hidden_layers")
    if depth is not None and cfg.fastv_layer >= depth:
        raise ValueError(f"--fastv-layer {cfg.fastv_layer} must be below the LLM's depth ({depth} layers in "
                         f"{storage.redact(cfg.lvlm)}): FastV prunes after that layer, so it would prune nothing")


def output_constants(cfg: JobConfig) -> dict[str, Any]:
    """Columns with one value per run (``cfg.run_id`` set): the method, the prompt and pruner choices, models."""
    from actors.prompt import resolve_answer_suffix
    from pipeline.config import TEXT_PICK_METHODS

    guided = cfg.method in TEXT_PICK_METHODS and cfg.clip is not None
    return {"method": cfg.method, "run_id": cfg.run_id, "lvlm_model": storage.redact(cfg.lvlm),
            "captioner_model": storage.redact(cfg.captioner) if cfg.uses_captions else None,
            "selector_model": storage.redact(cfg.selector) if cfg.uses_captions else None,
            "clip_model": storage.redact(cfg.clip) if cfg.clip else None,
            "conv": cfg.conv, "answer_suffix": resolve_answer_suffix(cfg.answer_suffix),
            "text_pick": cfg.text_pick if guided else None}


def write_summary(cfg: JobConfig, shards: list[Shard], run: dict[str, Any]) -> dict[str, Any]:
    """``<output>/summary.json`` from the output files of all ``shards`` (resumed ones too); printed too."""
    table = read_outputs(cfg, shards)
    kept = [k for k in table.column("keep_tokens").to_pylist() if k is not None]
    run["keep_tokens"] = kept[0] if kept else cfg.keep_tokens
    summary = summarize(table, run=run)
    resume.write_atomic(resume.join(cfg.output, "summary.json"), to_json(summary), cfg.s3_endpoint)
    print(format_table(summary), flush=True)
    return summary
