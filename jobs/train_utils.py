"""What every trainer under jobs/ shares: its one log line, its learning-rate schedule and its per-type weights."""

from __future__ import annotations

import math
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def parse_type_weights(spec: str) -> dict[str, float]:
    """A ``TYPE=W,...`` option (``train_accm.py --pretrain-question-weights``, ``train_lvlm_v2.py
    --question-weights``) -> {type: weight}; "" -> {}. Spaces around a part are allowed (``count=2, shape=1.5``)."""
    return {k.strip(): float(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv.strip())}
