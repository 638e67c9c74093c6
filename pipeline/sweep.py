"""The sweep's shared-encoding graph: every (method, pruning rate) over the same input in ONE Ray Data graph.

    read_parquet (pending shards) -> decode/validate (CPU tasks, once per item)
      -> SweepCaptionerTier (actor pool: vision tower ONCE per item; then, from that encoding, each
         setting's pruner + ACCM caption; one row per (item, setting), grouped by setting)
      -> LVLMTier (actor pool; rows answered in groups of one setting; FastV prunes in here from the full
         shared features) -> scoring (CPU tasks)
      -> driver: per setting, exactly the main job's layout under ``<output>/<method>/<rate>/``: one Parquet
         file per input shard (same name and schema), its ``_done/`` marker, then ``summary.json``

So a sweep of S settings runs the image decode and the CLIP tower once per item instead of S times, and
starts each actor pool once instead of S times. The rows of each (setting, shard) are written as soon as
that pair is complete; ``--resume`` skips a (setting, shard) whose marker matches, and a shard is read and
encoded only for the settings that still need it. Bad input rows give one error row per setting.

Wall time per setting: the settings run interleaved, so the sweep's wall time is apportioned to them by
their measured stage time (``latency_captioner_s`` + ``latency_lvlm_s`` summed over their rows, the shared
vision time split evenly); the shares add up to the sweep's wall time. FLOPs per row still count the full
vision tower: they are the cost of running that setting on its own, which is what the cost table prices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from pipeline import resume, storage
from pipeline.config import JobConfig
from pipeline.graph import (
    build_dataset,
    check_fastv_layer,
    node_gpus,
    output_constants,
    plan_shards,
    tier_resources,
    write_shard,
    write_summary,
)
from pipeline.report import rate_label
from pipeline.stages import SHARD, SweepCaptionerTier

log = logging.getLogger("accm.sweep")


@dataclass(frozen=True)
class Setting:
    """One (method, pruning rate) of a sweep; ``none`` has rate 0 (all tokens)."""

    method: str
    rate: float

    @property
    def label(self) -> str:
        """Its directory under the sweep's output: ``<method>/<rate>``."""
        return f"{self.method}/{rate_label(self.rate)}"

    @property
    def prune_rate(self) -> float | None:
        return None if self.method == "none" else self.rate


def setting_config(base: JobConfig, setting: Setting, output: str, sweep_id: str) -> JobConfig:
    """The main-job config of one setting: its method and rate, its output directory and run id."""
    return replace(
        base,
        method=setting.method,
        prune_rate=setting.prune_rate,
        keep_tokens=None,
        output=f"{output.rstrip('/')}/{setting.label}",
        run_id=f"{sweep_id}-{setting.method}-{rate_label(setting.rate)}",
        accm_fallback=False,  # an explicit accm setting must not silently become prumerge_plus
    )


def run_shared_sweep(base: JobConfig, settings: list[Setting], output: str,
                     sweep_id: str | None = None) -> dict[Setting, dict[str, Any]]:
    """Run every setting over ``base.input`` in one graph (``ray.init`` done by the caller).

    Returns each setting's summary (the dict its ``summary.json`` holds), ``wall_s`` being its share.
    """
    import ray

    t0 = time.perf_counter()
    sweep_id = sweep_id or base.run_id or time.strftime("%Y%m%dT%H%M%S")
    if not storage.exists(base.lvlm, s3_endpoint=base.s3_endpoint):
        raise FileNotFoundError(f"LVLM model not found at --lvlm {storage.redact(base.lvlm)}")
    cfgs = {s: setting_config(base, s, output, sweep_id) for s in settings}
    for cfg in cfgs.values():
        check_fastv_layer(cfg)
    by_label = {s.label: s for s in settings}
    fs, shards = plan_shards(base)

    todo: dict[str, set[str]] = {}  # shard -> labels of the settings that still need it
    skipped = dict.fromkeys(settings, 0)
    for shard in shards:
        for s, cfg in cfgs.items():
            if base.resume and resume.is_done(cfg.output, shard.rel, shard.ids, cfg.s3_endpoint):
                skipped[s] += 1
                continue
            resume.clear_marker(cfg.output, shard.rel, cfg.s3_endpoint)
            todo.setdefault(shard.rel, set()).add(s.label)
    processed = dict.fromkeys(settings, 0)
    busy = dict.fromkeys(settings, 0.0)
    for shard in [s for s in shards if not s.ids and s.rel in todo]:  # nothing to compute: empty outputs
        for label in todo[shard.rel]:
            write_shard(cfgs[by_label[label]], fs, shard, {}, output_constants(cfgs[by_label[label]]))
    work = [s for s in shards if s.ids and s.rel in todo]
    log.info("sweep %s: %d settings x %d shards (%d rows); %d (setting, shard) pairs to do, one vision "
             "encoding per item", sweep_id, len(settings), len(shards), sum(len(s.ids) for s in shards),
             sum(len(todo[s.rel]) for s in work))

    if work:
        res = tier_resources(base, ray.cluster_resources(), node_gpus(ray))
        triples = [(s.label, s.method, s.prune_rate) for s in settings]
        ds = build_dataset(base, fs, work, res, captioner=SweepCaptionerTier,
                           captioner_kwargs={"settings": triples, "todo": {s.rel: todo[s.rel] for s in work}})
        by_rel = {s.rel: s for s in work}
        consts = {s: output_constants(cfg) for s, cfg in cfgs.items()}
        results: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
            (label, s.rel): {} for s in work for label in todo[s.rel]
        }
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                key = (row["_setting"], row.pop(SHARD))
                bucket = results.get(key)
                if bucket is None:
                    log.warning("row %r of unknown or finished (setting, shard) %r ignored", row.get("id"), key)
                    continue
                bucket[row["id"]] = row  # a retried batch cannot duplicate a row
                shard = by_rel[key[1]]
                if len(bucket) == len(shard.ids):
                    setting = by_label[key[0]]
                    processed[setting] += write_shard(cfgs[setting], fs, shard, bucket, consts[setting])
                    busy[setting] += sum((r.get("latency_captioner_s") or 0.0) + (r.get("latency_lvlm_s") or 0.0)
                                         for r in bucket.values())
                    del results[key]
                    log.info("%s: shard %s written (%d rows)", key[0], key[1], len(shard.ids))
        if results:
            missing = {f"{label} {rel}": len(by_rel[rel].ids) - len(rows) for (label, rel), rows in results.items()}
            raise RuntimeError(f"rows missing after the graph finished: {missing}; those (setting, shard) pairs "
                               "have no marker, rerun with --resume")

    wall = time.perf_counter() - t0
    total_busy = sum(busy.values())
    summaries = {}
    for s, cfg in cfgs.items():
        share = busy[s] / total_busy if total_busy > 0 else 1.0 / len(settings)
        run = {"run_id": cfg.run_id, "method": s.method, "keep_tokens": None, "prune_rate": s.prune_rate,
               "input": storage.redact(base.input), "output": storage.redact(cfg.output), "shards": len(shards),
               "shards_skipped": skipped[s], "rows_processed": processed[s], "wall_s": wall * share,
               "sweep_wall_s": wall, "shared_vision_settings": len(settings)}
        summaries[s] = write_summary(cfg, shards, run)
    return summaries
