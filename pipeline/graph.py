"""The Ray Data graph of the main job and its driver (SPEC §4).

    read_parquet (pending shards) -> decode/validate (CPU tasks; rows already in parts are skipped)
      -> captioner tier (actor pool: vision tower once, pruner, ACCM caption model + selector)
      -> LVLM tier (actor pool: projector + pruned LLM + caption splice)
      -> scoring -> write_parts (CPU tasks: durable parts of --part-rows rows, pipeline.progress)
      -> driver: tiny per-part records -> finalize_shard (a Ray task per complete shard: one Parquet file per
         input shard, same relative name, then its completion marker with the shard's statistics)

The driver coordinates and never holds output rows: planning runs in Ray tasks (each returns a shard's small
facts and keeps its row filter in the object store), output bytes are written by workers, and the summary
is merged from the markers' statistics. Its memory grows with the number of shards, not of rows.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline import progress, resume, retry, sources, storage
from pipeline.config import JobConfig
from pipeline.lvlm_tier import LVLMTier
from pipeline.retrying_fs import retrying
from pipeline.run_facts import check_fastv_layer, output_constants
from pipeline.schema import SchemaError
from pipeline.stages import CaptionerTier, decode_batch, score_batch
from pipeline.summary import empty_stats, format_table, merge_stats, summarize_stats, to_json

log = logging.getLogger("accm.job")

MAIN = ""  # the main job's one output label (the sweep has one per setting)
# Rows per block = BLOCK_BATCHES x --batch-size. Blocks of one batch cost a third of the throughput on 2 CPUs
# (per-task overhead: 2400 rows in 69 s vs 46 s); blocks of 4 batches run as fast as whole-file blocks (45.8 s vs
# 43.9 s) and keep a crash's in-flight rows bounded (docs/notes/job.md).
BLOCK_BATCHES = 4


@dataclass
class Shard:
    """One input Parquet file as planned: small facts only (its rows stay in the file)."""

    rel: str  # relative name under --input = output file name under --output
    url: str  # as listed (keeps the scheme)
    path: str  # inside the pyarrow filesystem
    schema: Any  # pyarrow.Schema
    num_rows: int
    planned: int  # rows of it this run covers (--limit may cut the last shard)
    digest: str  # of the planned ids, in input order (the marker's check)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {done, stats | committed}
    source: sources.Source = field(default_factory=sources.Source)  # how the file is read

    def facts(self) -> dict[str, Any]:
        """What finalize_shard needs."""
        return {"rel": self.rel, "url": self.url, "schema": self.schema, "planned": self.planned,
                "digest": self.digest, "source": self.source}


@dataclass
class Target:
    """One output of a graph: the main job's --output, or one sweep setting's directory."""

    cfg: JobConfig
    const: dict[str, Any]


# ----------------------------------------------------------------------------------------------------
# planning (driver only, before anything is written)


def source_of(cfg: JobConfig, urls: list[str]) -> sources.Source:
    """The input's format (given or detected) and what its task needs to read it."""
    fmt = cfg.input_format or sources.detect_format(urls, cfg.task, cfg.s3_endpoint)
    from actors.prompt import resolve_answer_suffix

    line = None if cfg.answer_suffix is None else resolve_answer_suffix(cfg.answer_suffix)
    return sources.Source(fmt=fmt, task=cfg.task, image_root=cfg.image_root, annotations=cfg.annotations,
                          s3_endpoint=cfg.s3_endpoint, answer_line=line)


def shard_limits(cfg: JobConfig, source: sources.Source, urls: list[str], task_cpus: float) -> list[int | None]:
    """Rows each shard contributes under ``--limit`` (None: all); only with a limit, and only footers (Parquet)
    or a count in a Ray task (the other formats)."""
    if cfg.limit is None:
        return [None] * len(urls)
    import ray

    out, budget = [], cfg.limit
    count = ray.remote(progress.count_rows).options(num_cpus=task_cpus)
    for url in urls:
        if budget <= 0:
            out.append(0)
            continue
        try:
            rows = ray.get(count.remote(url, source))
        except storage.StorageError as exc:
            if isinstance(exc, retry.RetryBudgetExceeded):
                raise
            raise SchemaError(f"{storage.redact(url)}: not a readable {source.kind} file: {exc}") from None
        out.append(min(rows, budget))
        budget -= rows
    return out


def plan_shards(inputs: list[JobConfig], outputs: dict[str, str], task_cpus: float
                ) -> tuple[list[Shard], dict[str, Any]]:
    """List the input shards and plan each in a Ray task (schema, ids, markers and parts of every output).

    ``inputs``: one config per input (the main job: one; a sweep over several tasks: one per task, whose
    shards are then named ``<task>/<file>`` in every output). Returns the shards in input order and each
    shard's row filter as an object ref. A broken shard stops the job here, naming the file, before anything
    is written."""
    import ray

    task = ray.remote(progress.plan_shard).options(num_returns=2, num_cpus=task_cpus, max_retries=2)
    refs, sources_of = [], []
    for cfg in inputs:
        _, root = storage.resolve(cfg.input, s3_endpoint=cfg.s3_endpoint)
        urls = sources.list_inputs(cfg.input, cfg.input_format, s3_endpoint=cfg.s3_endpoint)
        if not urls:
            raise FileNotFoundError(f"no input files ({cfg.input_format or 'any known format'}) under --input "
                                    f"{storage.redact(cfg.input)}")
        source = source_of(cfg, urls)
        prefix = f"{cfg.task}/" if len(inputs) > 1 else ""
        for url, limit in zip(urls, shard_limits(cfg, source, urls, task_cpus), strict=True):
            _, path = storage.resolve(url, s3_endpoint=cfg.s3_endpoint)
            rel = prefix + sources.output_name(path[len(root):].lstrip("/") if path != root
                                               else path.rsplit("/", 1)[-1], source.fmt)
            refs.append(task.remote(url, rel, source, limit, outputs, cfg.resume, cfg.retry_budget_s))
            sources_of.append(source)
    shards, filters, retries = [], {}, {}
    for (facts_ref, filter_ref), source in zip(refs, sources_of, strict=True):
        facts = ray.get(facts_ref)
        if "error" in facts:
            raise SchemaError(facts["error"])
        retries = retry.merge_counts(retries, facts.pop("retries", {}))
        shard = Shard(**{k: facts[k] for k in ("rel", "url", "path", "schema", "num_rows", "planned", "digest",
                                               "labels")}, source=source)
        shards.append(shard)
        if any(not v["done"] and v["committed"] for v in shard.labels.values()) or shard.planned < shard.num_rows:
            filters[shard.rel] = filter_ref  # only shards whose rows need filtering keep theirs
    if retries:
        retry_ledger(inputs[0].run_id).add.remote(retries)
    return shards, filters


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


def read_shards(shards: list[Shard], task_cpus: float):
    """The read stage of shards of one source: the project's Parquet through Ray Data's reader; any other
    format through the task's reader in Ray tasks (one per file, yielding blocks of ``sources.CHUNK_ROWS``).
    Both carry each row's file as ``path``."""
    import ray.data

    source = shards[0].source
    if source.native:
        fs, _ = storage.resolve(shards[0].url, s3_endpoint=source.s3_endpoint)
        return ray.data.read_parquet([s.path for s in shards], filesystem=retrying(fs), include_paths=True,
                                     num_cpus=task_cpus)
    files = ray.data.from_items([{"url": s.url, "path": s.path} for s in shards], override_num_blocks=len(shards))
    return files.map_batches(sources.read_files, batch_size=1, batch_format="pyarrow", num_cpus=task_cpus,
                             fn_kwargs={"source": source})


def build_dataset(cfg: JobConfig, shards: list[Shard], res: Resources, outputs: dict[str, str],
                  filters: dict[str, Any], *, captioner: type = CaptionerTier,
                  captioner_kwargs: dict[str, Any] | None = None, lvlm: type = LVLMTier):
    """Ray Data graph over ``shards`` (lazy) ending in the writer stage: one small record per part written.

    ``captioner``/``lvlm``: the tiers' actor classes (the shared-encoding sweep passes ``SweepCaptionerTier``
    and its extra constructor arguments in ``captioner_kwargs``); ``filters``: shard -> object ref of its
    row filter (``progress.plan_shard``)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    retry.configure_ray_data(ctx)
    branches = []
    for source in dict.fromkeys(s.source for s in shards):  # one read stage per input (a sweep: per task)
        ds = read_shards([s for s in shards if s.source == source], res.task_cpus)
        # blocks of at most BLOCK_BATCHES batches (a Parquet file is otherwise one block, and an actor task takes
        # a whole block): this bounds the rows a crash can catch inside the tiers (see pipeline.progress)
        ds = ds.repartition(target_num_rows_per_block=BLOCK_BATCHES * cfg.batch_size)
        branches.append(ds.map_batches(
            decode_batch, batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=res.task_cpus,
            fn_kwargs={"max_pixels": cfg.max_pixels, "s3_endpoint": cfg.s3_endpoint,
                       "shard_names": {s.path: s.rel for s in shards}, "row_filters": filters or None,
                       "run_id": cfg.run_id, "budget_s": cfg.retry_budget_s},
        ))
    ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    # two batches in flight per actor (Ray's default is 4): the rows a crash can catch inside a tier
    cap_gpus = res.captioner.get("num_gpus", 0.0)
    ds = ds.map_batches(
        captioner, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(min_size=cfg.captioner_actors[0], max_size=cfg.captioner_actors[1],
                                  max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={"cfg": cfg, "num_gpus": cap_gpus, **(captioner_kwargs or {})}, **res.captioner,
    )
    lvlm_gpus = res.lvlm.get("num_gpus", 0.0)
    ds = ds.map_batches(  # a whole block (BLOCK_BATCHES model batches): the tier cuts it into length buckets
        lvlm, batch_format="pyarrow", batch_size=cfg.batch_size * BLOCK_BATCHES,
        compute=ActorPoolStrategy(min_size=cfg.lvlm_actors[0], max_size=cfg.lvlm_actors[1],
                                  max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={"cfg": cfg, "num_gpus": lvlm_gpus}, **res.lvlm,
    )
    ds = ds.map_batches(score_batch, batch_format="pyarrow", num_cpus=res.task_cpus / 4,
                        fn_kwargs={"task_of": {s.rel: s.source.task for s in shards}})
    # the writer is I/O: a quarter CPU, so Ray Data's CPU budget never starves it behind decode (answered rows
    # queued for it are rows a crash loses) nor it the decode stage
    return ds.map_batches(
        progress.write_parts, batch_format="pyarrow", batch_size=cfg.part_rows, num_cpus=res.task_cpus / 4,
        fn_kwargs={"outputs": outputs, "s3_endpoint": cfg.s3_endpoint, "budget_s": cfg.retry_budget_s,
                   "run_id": cfg.run_id},
    )


# ----------------------------------------------------------------------------------------------------
# running a graph to completion


_LEDGERS: dict[str, Any] = {}  # run id -> its ledger's handle: a named actor dies with its last handle


def retry_ledger(run_id: str | None):
    """The run's retry-count actor (created on first use; workers find it by name). The driver holds its
    handle until ``retry_counts`` lets it go."""
    import ray

    key = str(run_id)
    if key not in _LEDGERS:
        _LEDGERS[key] = ray.remote(progress.RetryLedger).options(
            name=progress.LEDGER_PREFIX + key, get_if_exists=True, num_cpus=0, lifetime=None).remote()
    return _LEDGERS[key]


@dataclass
class LabelResult:
    """What one output of a graph run adds up to."""

    stats: dict[str, Any] = field(default_factory=empty_stats)  # all its shards, resumed ones too
    processed: int = 0  # rows this run wrote
    busy_s: float = 0.0  # captioner + LVLM stage time of those rows
    skipped: int = 0  # shards already done (--resume)


def run_graph(base: JobConfig, targets: dict[str, Target], *, captioner: type = CaptionerTier,
              captioner_kwargs: Any = None, lvlm: type = LVLMTier,
              inputs: list[JobConfig] | None = None) -> tuple[list[Shard], dict[str, LabelResult]]:
    """Plan, run the graph over what is left, finalize each shard as it completes; per-label results.

    ``captioner_kwargs``: a function of (shards, filters) giving the captioner tier's extra arguments;
    ``inputs``: the configs whose inputs the graph reads (default: ``base``'s; a multi-task sweep: one per task)."""
    import ray

    res = tier_resources(base, ray.cluster_resources(), node_gpus(ray))
    outputs = {label: t.cfg.output for label, t in targets.items()}
    retry_ledger(base.run_id)
    shards, filters = plan_shards(inputs or [base], outputs, res.task_cpus)
    for output in dict.fromkeys(outputs.values()):
        preflight(output, str(base.run_id), base.s3_endpoint)
    results = {label: LabelResult() for label in targets}
    finalize = ray.remote(progress.finalize_shard).options(num_cpus=res.task_cpus, max_retries=2)
    pending: dict[tuple[str, str], int] = {}  # (label, shard) -> rows still to come
    finals = []

    def submit(label: str, shard: Shard) -> None:
        t = targets[label]
        finals.append(finalize.remote(shard.facts(), t.cfg.output, t.const, base.s3_endpoint, base.retry_budget_s))

    for shard in shards:
        for label, state in shard.labels.items():
            if state["done"]:
                results[label].skipped += 1
                results[label].stats = merge_stats(results[label].stats, state["stats"] or empty_stats())
            elif state["committed"] >= shard.planned:  # every row in parts already (a crash before finalize)
                submit(label, shard)
            else:
                pending[(label, shard.rel)] = shard.planned - state["committed"]
    work = [s for s in shards if any((label, s.rel) in pending for label in targets)]
    log.info("run %s: %d shards, %d rows planned; %d (output, shard) pairs already done (--resume), %d to process",
             base.run_id, len(shards), sum(s.planned for s in shards), sum(r.skipped for r in results.values()),
             len(pending))
    if work:
        log.info("resources: tasks %.2f CPU; captioner actors %s x %s; LVLM actors %s x %s", res.task_cpus,
                 base.captioner_actors, res.captioner, base.lvlm_actors, res.lvlm)
        extra = captioner_kwargs(work, filters) if callable(captioner_kwargs) else captioner_kwargs
        ds = build_dataset(base, work, res, outputs, {s.rel: filters[s.rel] for s in work if s.rel in filters},
                           captioner=captioner, captioner_kwargs=extra, lvlm=lvlm)
        by_rel = {s.rel: s for s in work}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for record in batch.to_pylist():
                key = (record["label"], record["shard"])
                result = results[record["label"]]
                result.processed += record["rows"]
                result.busy_s += record["busy_s"]
                pending[key] -= record["rows"]
                if pending[key] == 0:
                    del pending[key]
                    submit(record["label"], by_rel[record["shard"]])
        if pending:
            raise RuntimeError(f"rows missing after the graph finished (output shard: count): {pending}; those "
                               "shards have no marker, rerun with --resume")
    by_output = {t.cfg.output: label for label, t in targets.items()}
    for done in ray.get(finals):
        label = by_output[done["label_output"]]
        results[label].stats = merge_stats(results[label].stats, done["stats"])
        retry_ledger(base.run_id).add.remote(done["retries"])
    for output in dict.fromkeys(outputs.values()):  # every shard is final: drop the emptied _parts/ folder
        storage.delete_prefix(resume.join(output, progress.PARTS_DIR), s3_endpoint=base.s3_endpoint)
    return shards, results


def retry_counts(run_id: str | None) -> dict[str, int]:
    """Retries per operation over the driver and every worker of the run (then the ledger is let go)."""
    import ray

    ledger = retry_ledger(run_id)
    counts = retry.merge_counts(ray.get(ledger.get.remote()), retry.take_retry_counts())  # workers' + the driver's
    ray.kill(_LEDGERS.pop(str(run_id)))
    return counts


def preflight(output: str, run_id: str, s3_endpoint: str | None) -> None:
    """Write and delete one small object under ``output``: a wrong bucket or denied credentials fail here,
    in seconds and before any work, instead of at the first part."""
    probe = resume.join(output, f"{resume.MARKER_DIR}/.preflight-{run_id}")
    resume.write_atomic(probe, b"", s3_endpoint)
    storage.delete(probe, s3_endpoint=s3_endpoint)


# ----------------------------------------------------------------------------------------------------
# the job


def run_job(cfg: JobConfig, *, captioner: type = CaptionerTier, lvlm: type = LVLMTier) -> dict[str, Any]:
    """Run the pipeline on the current Ray (``ray.init`` done by the caller); returns the summary.

    ``captioner``/``lvlm``: the tiers' actor classes (tests pass subclasses that fail on purpose)."""
    t0 = time.perf_counter()
    retry.set_budget(cfg.retry_budget_s)
    run_id = cfg.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if not storage.exists(cfg.lvlm, s3_endpoint=cfg.s3_endpoint):
        raise FileNotFoundError(f"LVLM model not found at --lvlm {storage.redact(cfg.lvlm)} (the shipped small "
                                "models are built by jobs/train_lvlm.py into models/shapes/)")
    cfg = replace(effective_method(cfg), run_id=run_id)
    check_fastv_layer(cfg)
    shards, results = run_graph(cfg, {MAIN: Target(cfg, output_constants(cfg))}, captioner=captioner, lvlm=lvlm)
    result = results[MAIN]
    from pipeline.evaluate import evaluate_run

    run = {"run_id": run_id, "task": cfg.task, **evaluate_run(cfg, shards), "method": cfg.method, "keep_tokens": cfg.keep_tokens, "prune_rate": cfg.prune_rate,
           "input": storage.redact(cfg.input), "output": storage.redact(cfg.output), "shards": len(shards),
           "shards_skipped": result.skipped, "rows_processed": result.processed,
           "wall_s": time.perf_counter() - t0, "retries": retry_counts(run_id)}
    return write_summary(cfg, result.stats, run)


def write_summary(cfg: JobConfig, stats: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """``<output>/summary.json`` from the merged statistics of all shards (resumed ones too); printed too."""
    from pipeline.summary import stats_mode

    kept = stats_mode(stats, "keep_tokens")
    run["keep_tokens"] = int(kept) if kept is not None else cfg.keep_tokens
    summary = summarize_stats(stats, run=run)
    resume.write_atomic(resume.join(cfg.output, "summary.json"), to_json(summary), cfg.s3_endpoint)
    print(format_table(summary), flush=True)
    return summary
