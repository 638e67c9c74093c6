"""Facts of one run's configuration: the constant output columns it writes, and the checks it passes first."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import resume, storage
from pipeline.config import JobConfig

log = logging.getLogger("accm.job")


def check_fastv_layer(cfg: JobConfig) -> None:
    """Refuse a ``--fastv-layer`` / ``--dart-layer`` at or past the LLM's depth before anything runs (it would
    prune nothing).
    Reads only the checkpoint's ``config.json``."""
    import json

    if cfg.method not in ("fastv", "dart"):
        return
    flag, layer = ("--fastv-layer", cfg.fastv_layer) if cfg.method == "fastv" else ("--dart-layer", cfg.dart_layer)
    try:
        config = json.loads(storage.read_bytes(resume.join(cfg.lvlm, "config.json"), s3_endpoint=cfg.s3_endpoint))
    except Exception as exc:  # noqa: BLE001 - the LVLM tier reports an unreadable model itself
        log.warning("could not read the LVLM's config.json to check %s: %s", flag, exc)
        return
    depth = (config.get("text_config") or {}).get("num_hidden_layers")
    if depth is not None and layer >= depth:
        raise ValueError(f"{flag} {layer} must be below the LLM's depth ({depth} layers in {storage.redact(cfg.lvlm)}): "
                         f"{cfg.method} prunes after that layer, so it would prune nothing")


def output_constants(cfg: JobConfig) -> dict[str, Any]:
    """Columns with one value per run (``cfg.run_id`` set): the method, the prompt and pruner choices, models."""
    from actors.prompt import resolve_answer_suffix
    from pipeline.config import TEXT_PICK_METHODS

    guided = cfg.method in TEXT_PICK_METHODS and cfg.clip is not None
    return {"method": cfg.method, "run_id": cfg.run_id, "lvlm_model": storage.redact(cfg.lvlm),
            "captioner_model": storage.redact(cfg.captioner) if cfg.uses_captions else None,
            "selector_model": storage.redact(cfg.selector) if cfg.uses_captions else None,
            "clip_model": storage.redact(cfg.clip) if cfg.clip else None,
            "conv": cfg.conv,  # with a task and no --answer-suffix: null, the benchmark's line is in the question
            "answer_suffix": None if cfg.task and cfg.answer_suffix is None else resolve_answer_suffix(cfg.answer_suffix),
            "text_pick": cfg.text_pick if guided else None, "pruner_options": pruner_options(cfg)}


def pruner_options(cfg: JobConfig) -> str | None:
    """The method's named choices as one output value (which reading of its peer's code or paper ran)."""
    cdpruner = f"cdpruner_sign={cfg.cdpruner_sign}" if cfg.clip else "cdpruner_sign=none (no --clip: plain DPP)"
    if cfg.method == "accm":
        return f"accm_base={cfg.accm_base}" + (f"; {cdpruner}" if cfg.accm_base == "cdpruner" else "")
    return {"cdpruner": cdpruner, "fastv": f"fastv_layer={cfg.fastv_layer}",
            "dart": f"dart_layer={cfg.dart_layer}; dart_count={cfg.dart_count}"}.get(cfg.method)
