"""The LVLM tier: projector + pruned LLM (+ ACCM's caption splice) on the captioner tier's retained features.

Rows arrive in blocks of several model batches; each (method, budget) group is cut into length buckets
(``pipeline.batching``) and answered by ``actors.engine.LlavaEngine.generate`` (or a DeepSpeed tp replica,
``pipeline.tp_replica``). Every row gets its prediction, its LLM-side FLOPs and its prefill padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.batching import actor_threads, length_buckets
from pipeline.config import IN_LLM_METHODS, JobConfig
from pipeline.stages import (
    ANSWERED_SCHEMA,
    _table,
    load_engine,
    report_retries,
    run_rows,
    run_timed,
    set_retry_budget,
    worker_logging,
)


def lvlm_inputs(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """One ``generate`` call's inputs (plain Python + numpy: what tp rank 0 sends its helper ranks)."""
    from pipeline.config import CAPTION_METHODS

    return {
        "method": method,
        "keep_tokens": rows[0]["keep_tokens"],
        "features": [np.frombuffer(r["_retained"], dtype=np.float32).reshape(r["_retained_shape"]) for r in rows],
        "questions": [r["question"] for r in rows],
        "captions": [r.get("caption") for r in rows] if method in CAPTION_METHODS else None,
    }


def prompt_format(cfg: JobConfig):
    """The LVLM prompt of this run (``actors.prompt.PromptFormat``): with ``--task`` the rows carry the
    benchmark's answer-format line already, so no suffix is added here."""
    from actors.prompt import PromptFormat

    return PromptFormat(cfg.conv, None if cfg.task else cfg.answer_suffix)


def lvlm_generate(engine, cfg: JobConfig, inputs: dict[str, Any]):
    """``engine.generate`` on ``lvlm_inputs``: greedy answers + per-item FLOPs."""
    import torch

    device, dtype = engine.device, engine.dtype
    feats = inputs["features"]  # read-only views of the rows' bytes: one copy into a batch, none per row
    if len({f.shape for f in feats}) == 1:
        retained = torch.from_numpy(np.stack(feats)).to(device, dtype)
    else:
        retained = [torch.from_numpy(f.copy()).to(device, dtype) for f in feats]
    return engine.generate(retained, inputs["questions"], inputs["captions"], method=inputs["method"],
                           keep_tokens=inputs["keep_tokens"], fastv_layer=cfg.fastv_layer,
                           dart_layer=cfg.dart_layer, dart_count=cfg.dart_count,
                           max_new_tokens=cfg.max_new_tokens,
                           prompt_format=prompt_format(cfg))


class LVLMTier:
    """Actor of the LVLM tier: greedy answer from the retained features (+ caption) and the FLOPs.

    Rows are answered in groups of one method and budget (a sweep's rows carry their own ``_method``;
    the main job's all use ``cfg.method``). With ``--lvlm-tp`` this actor is rank 0 of a tp group.
    """

    rank_class: type | None = None  # tp helper ranks' actor class (None: pipeline.tp_replica.LVLMRank)

    def __init__(self, cfg: JobConfig, num_gpus: float = 0.0) -> None:
        import torch

        torch.set_grad_enabled(False)
        set_retry_budget(cfg)
        self.cfg = cfg
        worker_logging()
        actor_threads("LVLM tier")
        self.helpers: list[Any] = []  # tp ranks 1..N-1
        if cfg.lvlm_tp is None:
            self.engine = load_engine(cfg, num_gpus, "LVLM tier")
        else:
            from pipeline.tp_replica import start_tp_replica

            self.engine, self.helpers = start_tp_replica(cfg, num_gpus, rank_class=self.rank_class)

    def _generate(self, inputs: dict[str, Any]):
        if not self.helpers:
            return lvlm_generate(self.engine, self.cfg, inputs)
        from pipeline.tp_replica import generate_on_replica

        return generate_on_replica(self.engine, self.helpers, self.cfg, inputs)

    def _run(self, rows: list[dict[str, Any]]) -> None:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r.get("_method") or self.cfg.method, r["keep_tokens"]), []).append(r)
        for (method, _), rows_of_setting in groups.items():
            for group in self._buckets(rows_of_setting, method):  # a failing bucket is retried row by row
                run_rows(lambda rs, m=method: self._answer(rs, m), group, "lvlm")  # alone; no row runs twice

    def _buckets(self, rows: list[dict[str, Any]], method: str) -> list[list[dict[str, Any]]]:
        """Model batches of ``--batch-size`` rows of similar prompt length (pipeline.batching)."""
        from pipeline.config import CAPTION_METHODS

        fmt = prompt_format(self.cfg)
        lengths = [len(self.engine.prompt_ids(r["question"], r.get("caption") if method in CAPTION_METHODS
                                              else None, fmt)) for r in rows]
        return [[rows[i] for i in b] for b in length_buckets(lengths, self.cfg.batch_size)]

    def _answer(self, group: list[dict[str, Any]], method: str) -> None:
        gen = self._generate(lvlm_inputs(group, method))
        for i, r in enumerate(group):
            f = gen.flops[i]
            r["prediction"] = gen.texts[i].strip()
            r["prefill_tokens"] = gen.prefill_tokens[i]
            r["prefill_pad_tokens"] = gen.pad_tokens[i]
            r["flops_projector"] = float(f.get("projector", 0.0))
            r["flops_llm_prefill"] = float(f.get("llm_prefill", 0.0))
            r["flops_llm_decode"] = float(f.get("llm_decode", 0.0))
            if method in IN_LLM_METHODS:  # fastv / dart score inside the LLM: this tier ran their pruner
                front = r.setdefault("_flops_pruner_front", float(r["flops_pruner"] or 0.0))  # rerun-safe
                r["flops_pruner"] = front + float(f.get("pruner", 0.0))
            # the captioner tier priced what it ran (tower, pruner, caption model, selector): the total is
            # this tier's parts plus those, so the component columns add up to it
            r["flops_total"] = (r["flops_projector"] + r["flops_llm_prefill"] + r["flops_llm_decode"]
                                + r["flops_vision"] + r["flops_pruner"] + r["flops_captioner"]
                                + r["flops_selector"])
            r["flops_reference_total"] = float(f.get("reference_total", float("nan")))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        good = [r for r in rows if r["error"] is None]
        run_timed(self._run, good, "lvlm")
        report_retries(self.cfg.run_id)
        return _table(rows, ANSWERED_SCHEMA)
