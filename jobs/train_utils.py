"""What every trainer and diagnostic under jobs/ shares: its one log line, its learning-rate schedule, its per-type
weights and how it writes a JSON report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: str | Path | None, result: dict) -> None:
    """A report as indented JSON at ``path`` (its folder made), or nothing when no path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


def shown_path(path: str) -> str:
    """A model folder as a report names it: relative to the repository when inside it (no machine paths)."""
    repo = Path(__file__).resolve().parents[1]
    p = Path(path).resolve()
    return str(p.relative_to(repo)) if p.is_relative_to(repo) else path


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def parse_type_weights(spec: str) -> dict[str, float]:
    """A ``TYPE=W,...`` option (``train_accm.py --pretrain-question-weights``, ``train_lvlm_v2.py
    --question-weights``) -> {type: weight}; "" -> {}. Spaces around a part are allowed (``count=2, shape=1.5``)."""
    return {k.strip(): float(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv.strip())}
