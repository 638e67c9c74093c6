"""How an actor batches and threads its model work: length buckets and per-actor thread counts.

Length buckets: a left-padded batch computes every row at the batch's longest prompt, so the LVLM tier
takes a whole Ray block (``graph.BLOCK_BATCHES`` model batches, the unit the crash-loss bound counts in)
and runs its rows sorted by prompt length (a caption spliced into one prompt no longer pads fifteen
others). What padding remains is reported per row (``prefill_pad_tokens``) and as the summary's
``padding_fraction``.

Threads: each actor runs torch with as many intra-op threads as the CPUs Ray gave it (at least one), so
two actors on a 2-CPU node use two threads between them instead of each spawning one per core.
"""

from __future__ import annotations

import logging

log = logging.getLogger("accm.batching")


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of at most ``batch_size``, each a run of similar lengths (stable sort: equal
    lengths keep their order, so a block of equal prompts is batched exactly as it arrived)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(prefill_tokens: float | None, pad_tokens: float | None) -> float | None:
    """Share of the prefill's positions that were left padding (from per-row means of the two columns)."""
    if prefill_tokens is None or pad_tokens is None or prefill_tokens + pad_tokens <= 0:
        return None
    return pad_tokens / (prefill_tokens + pad_tokens)


def actor_threads(what: str) -> int:
    """Set torch's intra-op threads to this Ray actor's CPU share (rounded, at least 1; an actor without CPUs of
    its own, like a tp helper rank, gets 1); outside a Ray actor, leave torch's default. Returns the count."""
    import torch

    try:
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        in_actor = ctx is not None and ctx.get_actor_id() is not None
        cpus = float(ctx.get_assigned_resources().get("CPU", 0.0)) if in_actor else None
    except Exception:  # noqa: BLE001 - not in a Ray worker
        cpus = None
    if cpus is not None:
        torch.set_num_threads(max(1, round(cpus)))
        log.info("%s: %d torch thread(s) for %.2f CPU(s)", what, torch.get_num_threads(), cpus)
    return torch.get_num_threads()
