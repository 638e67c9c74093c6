"""The sweep's shared-encoding graph: every (method, pruning rate) over the same input in ONE Ray Data graph.

    read_parquet (pending shards) -> decode/validate (CPU tasks, once per item)
      -> SweepCaptionerTier (actor pool: vision tower ONCE per item; then, from that encoding, each
         setting's pruner + ACCM caption; one row per (item, setting), grouped by setting)
      -> LVLMTier (actor pool; rows answered in groups of one setting; FastV prunes in here from the full
         shared features) -> scoring -> write_parts (CPU tasks: durable parts per setting and shard)
      -> driver (tiny records) -> finalize_shard tasks: per setting, exactly the main job's layout under
         ``<output>/<method>/<rate>/``: one Parquet file per input shard (same name and schema), its
         ``_done/`` marker with the shard's statistics, then ``summary.json`` merged from those

So a sweep of S settings runs the image decode and the CLIP tower once per item instead of S times, and
starts each actor pool once instead of S times. The write path is the main job's (``pipeline.progress``):
finished rows become durable parts as they go, a (setting, shard) is finalized by a worker as soon as it is
complete, ``--resume`` skips a (setting, shard) whose marker matches and the rows already in its parts, and a
shard is read and encoded only for the settings that still need it. Bad input rows give one error row per
setting.

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

from pipeline import retry, storage
from pipeline.config import JobConfig
from pipeline.evaluate import evaluate_run
from pipeline.graph import Target, retry_counts, run_graph, write_summary
from pipeline.report import rate_label
from pipeline.run_facts import check_fastv_layer, output_constants
from pipeline.stages import SweepCaptionerTier

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


def task_inputs(base: JobConfig, tasks: list[str], benchmarks: dict[str, dict[str, Any]]) -> list[JobConfig]:
    """One input config per task of a multi-task sweep, from a benchmarks file (task -> input, input_format,
    image_root, annotations; relative paths are relative to that file's folder, already resolved)."""
    missing = [t for t in tasks if t not in benchmarks]
    if missing:
        raise ValueError(f"--tasks {','.join(missing)}: not in the benchmarks file (it has "
                         f"{', '.join(benchmarks) or 'none'})")
    allowed = {"input", "input_format", "image_root", "annotations"}
    out = []
    for task in tasks:
        entry = benchmarks[task]
        unknown = set(entry) - allowed
        if unknown or "input" not in entry:
            raise ValueError(f"benchmarks file, {task}: needs 'input' and only {sorted(allowed)}, got {sorted(entry)}")
        out.append(replace(base, task=task, **entry).validate())
    return out


def run_shared_sweep(base: JobConfig, settings: list[Setting], output: str, sweep_id: str | None = None,
                     inputs: list[JobConfig] | None = None) -> dict[Setting, dict[str, Any]]:
    """Run every setting over ``base.input`` (or over every task's input: ``inputs``) in one graph
    (``ray.init`` done by the caller).

    Returns each setting's summary (the dict its ``summary.json`` holds), ``wall_s`` being its share.
    """
    t0 = time.perf_counter()
    retry.set_budget(base.retry_budget_s)
    sweep_id = sweep_id or base.run_id or time.strftime("%Y%m%dT%H%M%S")
    base = replace(base, run_id=sweep_id)
    if not storage.exists(base.lvlm, s3_endpoint=base.s3_endpoint):
        raise FileNotFoundError(f"LVLM model not found at --lvlm {storage.redact(base.lvlm)}")
    cfgs = {s: setting_config(base, s, output, sweep_id) for s in settings}
    for cfg in cfgs.values():
        check_fastv_layer(cfg)
    targets = {s.label: Target(cfg, output_constants(cfg)) for s, cfg in cfgs.items()}
    triples = [(s.label, s.method, s.prune_rate) for s in settings]

    def captioner_kwargs(work, filters) -> dict[str, Any]:
        todo = {shard.rel: {label for label, state in shard.labels.items() if not state["done"]} for shard in work}
        return {"settings": triples, "todo": todo, "row_filters": {s.rel: filters[s.rel] for s in work
                                                                   if s.rel in filters} or None}

    log.info("sweep %s: %d settings over %s, one vision encoding per item", sweep_id, len(settings),
             ", ".join(f"{c.task or 'input'} {storage.redact(c.input)}" for c in inputs or [base]))
    shards, results = run_graph(base, targets, captioner=SweepCaptionerTier, captioner_kwargs=captioner_kwargs,
                                inputs=inputs)
    wall = time.perf_counter() - t0
    retries = retry_counts(sweep_id)
    total_busy = sum(r.busy_s for r in results.values())
    summaries = {}
    for s, cfg in cfgs.items():
        result = results[s.label]
        share = result.busy_s / total_busy if total_busy > 0 else 1.0 / len(settings)
        run = {"run_id": cfg.run_id, **evaluate_run(cfg, shards), "method": s.method, "keep_tokens": None, "prune_rate": s.prune_rate,
               "input": storage.redact(base.input), "output": storage.redact(cfg.output), "shards": len(shards),
               "shards_skipped": result.skipped, "rows_processed": result.processed, "wall_s": wall * share,
               "sweep_wall_s": wall, "shared_vision_settings": len(settings), "retries": retries}
        summaries[s] = write_summary(cfg, result.stats, run)
    return summaries
