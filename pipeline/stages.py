"""The pipeline's stages as Ray Data ``map_batches`` callables: thin wrappers over plain modules.

Every stage takes and returns a ``pyarrow.Table`` with explicit types, so that a batch of all-null
values never turns a column into Arrow's ``null`` type, and carries only what the next stage needs
(SPEC §4): the image leaves after the captioner tier, the retained features after the LVLM tier.
A row whose ``error`` is set passes through every later stage untouched: one input row, one output row
(the sweep's ``SweepCaptionerTier``: one output row per input row and setting, ``pipeline/sweep.py``).

Internal columns start with ``_``; the driver (``pipeline.graph``) joins the passthrough input
columns back by ``id`` when it writes a shard, so they never travel through the actors.

The classes also run without Ray (``benchmarks/bench_pipeline.py`` calls them in a plain loop).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import tasks
from pipeline.batching import actor_threads
from pipeline.config import IN_LLM_METHODS, JobConfig
from pipeline.schema import PREFILL_COLUMNS

log = logging.getLogger("accm.stages")

SHARD = "_shard"  # the input file a row came from (Ray Data's include_paths column, renamed)
PATH_COLUMN = "path"

_LIST_STR = pa.list_(pa.string())
_LIST_I32 = pa.list_(pa.int32())
_LIST_F32 = pa.list_(pa.float32())

DECODED_SCHEMA = pa.schema([
    (SHARD, pa.string()), ("id", pa.string()), ("question", pa.string()), ("_answers", pa.string()),
    ("error", pa.string()), ("_image", pa.binary()), ("_image_shape", _LIST_I32),
    ("latency_decode_s", pa.float64()),
])
CAPTIONED_SCHEMA = pa.schema([
    (SHARD, pa.string()), ("id", pa.string()), ("question", pa.string()), ("_answers", pa.string()),
    ("error", pa.string()), ("latency_decode_s", pa.float64()),
    ("_retained", pa.binary()), ("_retained_shape", _LIST_I32),
    ("visual_tokens_total", pa.int32()), ("keep_tokens", pa.int32()),
    ("caption", pa.string()), ("caption_candidates", _LIST_STR), ("selector_probs", _LIST_F32),
    ("flops_vision", pa.float64()), ("flops_pruner", pa.float64()),  # what the captioner tier ran
    ("flops_captioner", pa.float64()), ("flops_selector", pa.float64()), ("latency_captioner_s", pa.float64()),
    ("_method", pa.string()), ("_setting", pa.string()),  # a sweep's rows: their setting (main job: null)
])
_FLOPS = ("flops_projector", "flops_llm_prefill", "flops_llm_decode", "flops_total", "flops_reference_total")
ANSWERED_SCHEMA = pa.schema([
    *(f for f in CAPTIONED_SCHEMA if f.name not in ("_retained", "_retained_shape", "question")),
    ("prediction", pa.string()), *((n, pa.float64()) for n in _FLOPS), ("latency_lvlm_s", pa.float64()),
    *((n, pa.int32()) for n in PREFILL_COLUMNS),
])
SCORED_SCHEMA = pa.schema([*(f for f in ANSWERED_SCHEMA if f.name != "_answers"), ("score", pa.float64())])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------------------------------
# decode + validate (CPU tasks)


def _column(batch: pa.Table, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def row_filter(ref: Any) -> dict[str, Any]:
    """A shard's row filter (``pipeline.progress.plan_shard``) from its object ref, fetched once per process."""
    key = ref.hex() if hasattr(ref, "hex") else id(ref)
    if key not in _FILTERS:
        import ray

        _FILTERS[key] = ray.get(ref) if hasattr(ref, "hex") else ref
    return _FILTERS[key]


_FILTERS: dict[Any, dict[str, Any]] = {}


def _skipped(filters: dict[str, Any] | None, shard: str, id_: str, label: str | None = None) -> bool:
    """Whether a row is not this run's work: cut by --limit, or already in a durable part (for ``label``, or
    for every pending output when ``label`` is None)."""
    if not filters or shard not in filters:
        return False
    f = row_filter(filters[shard])
    if f.get("keep") is not None and id_ not in f["keep"]:
        return True
    return id_ in (f["skip_all"] if label is None else f["skip"].get(label, ()))


def decode_batch(batch: pa.Table, *, max_pixels: int, s3_endpoint: str | None = None,
                 row_filters: dict[str, Any] | None = None, shard_names: dict[str, str] | None = None,
                 run_id: str | None = None, budget_s: float | None = None) -> pa.Table:
    """Input rows -> decoded RGB images (or a per-row ``error``); never raises on bad data.

    ``row_filters``: shard -> its row filter (an object ref, or the dict itself): rows of ``--limit``'s cut
    and rows already in durable parts (``--resume``) are dropped here, before any work."""
    from pipeline import retry
    from pipeline.decode import decode_image, validate_question
    from pipeline.progress import report_retries
    from pipeline.storage import read_bytes

    if budget_s is not None:
        retry.set_budget(budget_s)
    paths = _column(batch, PATH_COLUMN)
    ids, questions, images = _column(batch, "id"), _column(batch, "question"), _column(batch, "image")
    uris, answers = _column(batch, "image_uri"), _column(batch, "answers")
    read_errors = _column(batch, "input_error")
    out = []
    for path, id_, question, image, uri, ans, read_error in zip(paths, ids, questions, images, uris, answers,
                                                                read_errors, strict=True):
        shard = (shard_names or {}).get(path, path)
        if _skipped(row_filters, shard, id_):
            continue
        t0 = time.perf_counter()
        row: dict[str, Any] = {SHARD: shard, "id": id_, "question": question}
        error = read_error or validate_question(question)
        if error is None and ans is not None:
            if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
                error = f"answers: expected a list of strings, got {type(ans).__name__}"
            else:
                row["_answers"] = json.dumps(ans)
        if error is None:
            img, error = decode_image(image, uri, max_pixels=max_pixels,
                                      read_uri=lambda u: read_bytes(u, s3_endpoint=s3_endpoint))
            if error is None:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
                row["_image"], row["_image_shape"] = arr.tobytes(), list(arr.shape)
        row["error"] = error
        row["latency_decode_s"] = time.perf_counter() - t0
        out.append(row)
    report_retries(run_id)
    return _table(out, DECODED_SCHEMA)


def _image(row: dict[str, Any]):
    from PIL import Image

    h, w, c = row["_image_shape"]
    return Image.fromarray(np.frombuffer(row["_image"], dtype=np.uint8).reshape(h, w, c), "RGB")


# ----------------------------------------------------------------------------------------------------
# model loading


def _device(num_gpus: float, dtype: str | None = None) -> tuple[str, Any]:
    """(device, torch dtype) of a tier: ``dtype`` (--dtype) if given, else bf16 on CUDA and fp32 on CPU."""
    import torch

    device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
    name = dtype or ("bf16" if device == "cuda" else "fp32")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def fetch_model(url: str, cfg: JobConfig, what: str) -> str:
    """Local directory of a model (``s3://`` copied once per node into ``cfg.model_cache``)."""
    from pipeline.storage import download_dir, redact

    t0 = time.perf_counter()
    local = download_dir(url, cfg.model_cache, s3_endpoint=cfg.s3_endpoint)
    where = "local" if local == url or not url.startswith(("s3://", "s3a://")) else f"cached at {local}"
    log.info("%s: model %s (%s, %.1fs) in pid %d", what, redact(url), where, time.perf_counter() - t0, os.getpid())
    return local


def worker_logging() -> None:
    """INFO logs of this package from inside Ray workers (Ray forwards their stderr to the driver)."""
    from pipeline.logs import setup_logging

    setup_logging(("accm",), with_time=False)


def load_engine(cfg: JobConfig, num_gpus: float, what: str, *, tp: int | None = None, device: str | None = None,
                vision_only: bool = False):
    """The LLaVA engine of a tier; ``tp``: its model split by DeepSpeed over ``tp`` ranks (``init_rank`` first);
    ``vision_only``: the tower and projector only (the captioner tier never runs the LLM: on LLaVA-1.5-7B that
    is ~0.6 GB instead of ~14 GB on its GPU), plus the ``--clip`` text guide when one is given (loaded once
    per actor, here)."""
    from actors.engine import LlavaEngine

    worker_logging()

    default_device, dtype = _device(num_gpus, cfg.dtype)
    device = device or default_device
    path = fetch_model(cfg.lvlm, cfg, what)
    t0 = time.perf_counter()
    clip = fetch_model(cfg.clip, cfg, f"{what} (--clip text guide)") if vision_only and cfg.clip else None
    engine = LlavaEngine.from_pretrained(path, device=device, dtype=dtype, vision_only=vision_only,
                                         clip_text_url=clip)
    if tp is not None:  # rebuild the engine around the sharded modules (its decoder loop holds them)
        from actors.tp import shard_model

        model = shard_model(engine.model, tp)
        engine = LlavaEngine(model, engine.processor, model_id=engine.model_id, text_guide=engine.text_guide)
    log.info("%s: LLaVA%s loaded on %s/%s%s in %.1fs", what, " vision tower + projector" if vision_only else "",
             device, str(dtype).removeprefix("torch."), f", DeepSpeed tp={tp}" if tp is not None else "",
             time.perf_counter() - t0)
    return engine


# ----------------------------------------------------------------------------------------------------
# captioner tier: vision tower once -> pruner -> (accm) caption model + selector


def encode_rows(engine, rows: list[dict[str, Any]], *, projected: bool | None = None):
    """The vision tower once over decoded rows -> ``VisionBatch`` (features, CLS attention, keys; with
    ``projected`` also the last layer's projected patches: ``needs_projection``)."""
    return engine.encode_images(engine.preprocess([_image(r) for r in rows]), projected=projected)


def needs_projection(engine, accm, method: str, cfg: JobConfig) -> bool:
    """Whether one setting reads CLIP's projected last-layer patches: its pruner (ACCM: its ``--accm-base``) is
    text-guided with ``--clip`` loaded, or its caption model reads them (the ACCM reference's input). What a
    setting does not read is neither run (one-setting jobs) nor priced (a sweep runs it once for all)."""
    from pipeline.config import CAPTION_METHODS

    if engine.uses_projection(cfg.accm_base if method == "accm" else method):
        return True
    return (method in CAPTION_METHODS and engine.text_guide is not None and accm is not None
            and accm.input_features == "projected")


def prune_and_caption(engine, accm, vision, rows: list[dict[str, Any]], method: str, keep_tokens: int | None,
                      prune_rate: float | None, cfg: JobConfig) -> list[dict[str, Any]]:
    """One setting from an encoded batch: the pruner's retained features, the budget, (accm) the caption and
    the FLOPs of what this tier ran (tower, pruner, caption model, selector), as per-row output fields.
    ``vision`` is read, never changed, so several settings can share it. The side path (text guide, caption
    model, selector) reads the plain question (``actors.prompt.plain_question``), never the answer suffix."""
    import torch

    from actors.engine import resolve_keep_tokens
    from actors.prompt import plain_question
    from pipeline.config import CAPTION_METHODS

    ids, questions = [r["id"] for r in rows], [plain_question(r["question"]) for r in rows]
    total = int(vision.patch_features.shape[1])
    keep = total if method == "none" else resolve_keep_tokens(total, keep_tokens, prune_rate)
    if method == "none" or method in IN_LLM_METHODS:  # fastv / dart prune inside the LLM (LVLM tier)
        retained, pruned = vision.patch_features, None
    else:  # accm: its caption model reads what its base pruner (--accm-base) discards
        pruned = engine.prune(vision, cfg.accm_base if method == "accm" else method, keep, ids, questions,
                              text_pick=cfg.text_pick, cdpruner_sign=cfg.cdpruner_sign)
        retained = pruned.retained
    caps = None
    if method in CAPTION_METHODS:
        if accm is None:
            raise RuntimeError("accm unavailable")
        caps = accm.caption(discarded_features(accm, pruned, vision), questions, beams=cfg.num_candidates)
    front = engine.front_flops(cfg.accm_base if method == "accm" else method, int(retained.shape[1]), questions,
                               projected=vision.projected is not None and needs_projection(engine, accm, method, cfg))
    retained = retained.detach().to("cpu", torch.float32).numpy()
    out = []
    for i in range(len(rows)):
        feats = np.ascontiguousarray(retained[i])
        o: dict[str, Any] = {"_retained": feats.tobytes(), "_retained_shape": list(feats.shape),
                             "visual_tokens_total": total, "keep_tokens": keep,
                             "flops_vision": float(front[i]["vision"]), "flops_pruner": float(front[i]["pruner"]),
                             "flops_captioner": 0.0, "flops_selector": 0.0}
        if caps is not None:
            o["caption"] = caps.selected[i]
            o["caption_candidates"] = list(caps.candidates[i])
            o["selector_probs"] = [float(p) for p in caps.probs[i]]
            o["flops_captioner"] = float(caps.flops_captioner[i])
            o["flops_selector"] = float(caps.flops_selector[i])
        out.append(o)
    return out


def discarded_features(accm, pruned, vision):
    """The discarded patches in the form the caption model reads (its config names it): the feature layer's
    (the project's models) or the projected last-layer embeddings (ACCM's reference, needs ``--clip``); with
    ``kept_context`` the kept patches follow, flagged (``actors.kept_context``)."""
    full, discarded = vision.patch_features, pruned.discarded
    if accm.input_features == "projected":
        if pruned.discarded_projected is None:
            raise RuntimeError("this caption model reads CLIP's projected patch embeddings: pass --clip DIR (a "
                               "CLIPModel folder with the tower's visual_projection, e.g. "
                               "openai/clip-vit-large-patch14-336)")
        full, discarded = vision.projected, pruned.discarded_projected
    if not accm.captioner.config.kept_context:
        return discarded
    from actors.kept_context import append_kept

    return append_kept(discarded, full, pruned.discarded_indices.tolist())


def _load_accm(cfg: JobConfig, engine) -> tuple[Any, str | None]:
    """(ACCM caption model + selector, None) or (None, why not): a missing model is a per-row error."""
    try:
        from actors.accm import ACCMCaptioner

        cap = fetch_model(cfg.captioner, cfg, "captioner tier (caption model)")
        sel = fetch_model(cfg.selector, cfg, "captioner tier (selector)")
        accm = ACCMCaptioner.from_pretrained(cap, sel, device=engine.device)
        log.info("captioner tier: ACCM caption model + selector ready")
        return accm, None
    except Exception as exc:  # noqa: BLE001 - reported in every row, the job goes on
        error = f"accm unavailable: {_short(exc)}"
        log.error("captioner tier: %s", error)
        return None, error


class CaptionerTier:
    """Actor of the captioner tier. Emits the retained patch features, the selected caption and FLOPs."""

    def __init__(self, cfg: JobConfig, num_gpus: float = 0.0) -> None:
        import torch

        torch.set_grad_enabled(False)
        set_retry_budget(cfg)
        self.cfg = cfg
        self.engine = load_engine(cfg, num_gpus, "captioner tier", vision_only=True)
        actor_threads("captioner tier")
        self.accm, self.accm_error = _load_accm(cfg, self.engine) if cfg.uses_captions else (None, None)
        self.projected = needs_projection(self.engine, self.accm, cfg.method, cfg)

    def _run(self, rows: list[dict[str, Any]]) -> None:
        cfg = self.cfg
        vision = encode_rows(self.engine, rows, projected=self.projected)
        outs = prune_and_caption(self.engine, self.accm, vision, rows, cfg.method, cfg.keep_tokens, cfg.prune_rate,
                                 cfg)
        for r, o in zip(rows, outs, strict=True):
            r.update(o)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        good = [r for r in rows if r["error"] is None]
        t0 = time.perf_counter()
        if good and self.cfg.uses_captions and self.accm is None:
            for r in good:
                r["error"] = self.accm_error
            good = []
        run_timed(self._run, good, "captioner", since=t0)
        report_retries(self.cfg.run_id)
        return _table(rows, CAPTIONED_SCHEMA)


class SweepCaptionerTier:
    """Captioner tier of the shared-encoding sweep (``pipeline/sweep.py``): the vision tower ONCE per item,
    then every setting's pruner (+ ACCM caption) from that one encoding (FastV and ``none`` take the full
    features). Emits one row per (item, setting), grouped by setting, with ``_method`` / ``_setting``.

    ``settings``: (label, method, prune_rate) triples; ``todo``: shard -> labels still to do (``--resume``),
    None = all. A row that failed decoding or encoding yields one error row per setting; a setting that
    fails on a row (or has no ACCM models) errors that row in that setting only.
    Per-row ``latency_captioner_s``: this setting's pruning/caption time per item plus an equal share
    (1/number of settings) of the shared vision time, so that the latencies add up to the time spent.
    """

    def __init__(self, cfg: JobConfig, settings: list[tuple[str, str, float | None]],
                 todo: dict[str, set[str]] | None = None, row_filters: dict[str, Any] | None = None,
                 num_gpus: float = 0.0) -> None:
        import torch

        from pipeline.config import CAPTION_METHODS

        torch.set_grad_enabled(False)
        set_retry_budget(cfg)
        self.cfg, self.settings, self.todo, self.row_filters = cfg, list(settings), todo, row_filters
        self.engine = load_engine(cfg, num_gpus, "captioner tier (sweep)", vision_only=True)
        needs_accm = any(method in CAPTION_METHODS for _, method, _ in self.settings)
        self.accm, self.accm_error = _load_accm(cfg, self.engine) if needs_accm else (None, None)
        # the shared encoding computes the projected patches once if any setting reads them
        self.projected = any(needs_projection(self.engine, self.accm, method, cfg) for _, method, _ in self.settings)

    def _encode(self, rows: list[dict[str, Any]]):
        """(VisionBatch, the rows it holds in order); a failing batch is retried row by row (``run_rows``)."""
        from actors.vision import VisionBatch

        if not rows:
            return None, []
        parts: list[tuple[Any, list[dict[str, Any]]]] = []
        run_rows(lambda rs: parts.append((encode_rows(self.engine, rs, projected=self.projected), rs)), rows,
                 "captioner")
        if not parts:
            return None, []
        vision = parts[0][0] if len(parts) == 1 else VisionBatch.concat([v for v, _ in parts])
        return vision, [r for _, rs in parts for r in rs]

    def _one_setting(self, vision, good: list[tuple[int, dict[str, Any]]], method: str,
                     prune_rate: float | None) -> None:
        """Prune (+ caption) encoded rows ``(vision row, output row)`` for one setting; a failing batch
        is retried row by row, so one bad row errors only itself."""
        index = {id(c): i for i, c in good}

        def run(rs: list[dict[str, Any]]) -> None:
            idx = [index[id(c)] for c in rs]
            part = vision if idx == list(range(len(vision))) else vision.select(idx)
            outs = prune_and_caption(self.engine, self.accm, part, rs, method, None, prune_rate, self.cfg)
            for c, o in zip(rs, outs, strict=True):
                c.update(o)

        run_rows(run, [c for _, c in good], "captioner")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.config import CAPTION_METHODS

        rows = batch.to_pylist()
        t0 = time.perf_counter()
        vision, encoded = self._encode([r for r in rows if r["error"] is None])
        vision_share = (time.perf_counter() - t0) / max(len(encoded), 1) / len(self.settings)
        where = {id(r): i for i, r in enumerate(encoded)}
        out: list[dict[str, Any]] = []
        for label, method, prune_rate in self.settings:
            mine = [r for r in rows if (self.todo is None or label in self.todo.get(r[SHARD], ()))
                    and not _skipped(self.row_filters, r[SHARD], r["id"], label)]
            copies = [dict(r, _method=method, _setting=label) for r in mine]
            good = [(where[id(r)], c) for r, c in zip(mine, copies, strict=True) if id(r) in where]
            t1 = time.perf_counter()
            if good and method in CAPTION_METHODS and self.accm is None:
                for _, c in good:
                    c["error"] = self.accm_error
                good = []
            if good:
                self._one_setting(vision, good, method, prune_rate)
            dt = (time.perf_counter() - t1) / max(len(good), 1)
            for _, c in good:
                if c["error"] is None:
                    c["latency_captioner_s"] = dt + vision_share
            out.extend(copies)
        report_retries(self.cfg.run_id)
        return _table(out, CAPTIONED_SCHEMA)


def run_rows(fn, rows: list[dict[str, Any]], stage: str) -> None:
    """``fn(rows)`` on the batch; if the batch fails, row by row so that one bad row cannot sink the rest."""
    try:
        fn(rows)
        return
    except Exception as exc:  # noqa: BLE001
        if len(rows) == 1:
            rows[0]["error"] = f"{stage}: {_short(exc)}"
            return
        log.warning("%s: batch of %d failed (%s); retrying row by row", stage, len(rows), _short(exc))
    for r in rows:
        try:
            fn([r])
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{stage}: {_short(exc)}"


def run_timed(fn, rows: list[dict[str, Any]], stage: str, *, since: float | None = None) -> None:
    """``run_rows`` plus each row's share of the wall time since ``since`` (default: now) in
    ``latency_<stage>_s``."""
    t0 = time.perf_counter() if since is None else since
    if rows:
        run_rows(fn, rows, stage)
    dt = (time.perf_counter() - t0) / max(len(rows), 1)
    for r in rows:
        r[f"latency_{stage}_s"] = dt


def set_retry_budget(cfg: JobConfig) -> None:
    """Actors retry object-store faults (model downloads, ...) for as long as the job says."""
    from pipeline import retry

    retry.set_budget(cfg.retry_budget_s)


def report_retries(run_id: str | None) -> None:
    from pipeline.progress import report_retries as report

    report(run_id)


# ----------------------------------------------------------------------------------------------------
# scoring (CPU tasks)


def score_batch(batch: pa.Table, *, task_of: dict[str, str | None] | None = None) -> pa.Table:
    """The per-row score: its shard's task's official per-item rule (``task_of``: shard -> task,
    ``pipeline.tasks``), VQA soft accuracy without a task; null without answers or with an error."""
    from pipeline.scoring import score_item

    rows = batch.to_pylist()
    for r in rows:
        task = (task_of or {}).get(r[SHARD])
        score = tasks.get(task).score if task else score_item
        answers = json.loads(r["_answers"]) if r.get("_answers") else None
        r["score"] = None if r["error"] is not None or not answers or r["prediction"] is None else score(
            r["prediction"], answers)
    return _table(rows, SCORED_SCHEMA)

