"""The LVLM tier's tensor-parallel replica (``--lvlm-tp N``): rank 0 is the ``LVLMTier`` actor, ranks 1..N-1
are ``LVLMRank`` helpers it starts on its node. Every rank runs the same ``generate`` on the same inputs;
a dead helper makes rank 0 exit so that Ray Data restarts the whole replica and retries the batch.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.batching import actor_threads
from pipeline.config import JobConfig
from pipeline.lvlm_tier import lvlm_generate
from pipeline.stages import (
    _device,
    _short,
    load_engine,
    log,
)


class LVLMRank:
    """Rank ``rank`` >= 1 of a tensor-parallel LVLM replica: a plain Ray actor that rank 0 starts on its
    node. Same model, same shard, same ``generate`` on the same inputs as rank 0, answers dropped."""

    def __init__(self, cfg: JobConfig, rank: int, master_addr: str, master_port: int, visible_gpus: str) -> None:
        """``visible_gpus``: rank 0's CUDA_VISIBLE_DEVICES (this rank uses ``cuda:<rank>``); "" for CPU ranks."""
        if visible_gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus  # before CUDA starts
        import torch

        from actors.tp import init_rank

        torch.set_grad_enabled(False)
        self.cfg = cfg
        init_rank(rank, cfg.lvlm_tp, master_addr=master_addr, master_port=master_port,
                  backend="nccl" if visible_gpus else "gloo")
        gpus, device = (1.0, f"cuda:{rank}") if visible_gpus else (0.0, "cpu")
        self.engine = load_engine(cfg, gpus, f"LVLM tier (tp rank {rank})", tp=cfg.lvlm_tp, device=device)
        actor_threads(f"LVLM tier (tp rank {rank})")  # no CPUs of its own (num_cpus=0): one thread

    def ready(self) -> bool:
        return True

    def generate(self, inputs: dict[str, Any]) -> None:
        lvlm_generate(self.engine, self.cfg, inputs)


def start_tp_replica(cfg: JobConfig, num_gpus: float, rank_class: type | None = None):
    """``--lvlm-tp N``: this process becomes rank 0 of a tp group, with N-1 ``LVLMRank`` helpers.

    This actor holds the replica's N GPUs (one Ray actor's resources are always on one node); the helpers
    ask Ray for nothing, are pinned to this node, see the same GPUs and use ``cuda:<rank>``. They are owned
    by this actor, so they die with it (Ray Data then restarts the replica, helpers included). Without GPUs
    (``num_gpus`` 0) every rank is a CPU process and the group uses gloo.
    ``rank_class``: the helpers' actor class (default ``LVLMRank``; a test passes a subclass that fails).
    Returns (rank 0's engine, helper actor handles).
    """
    import ray

    from actors.tp import free_port, init_rank

    tp, helpers, addr = cfg.lvlm_tp, [], "127.0.0.1"
    on_gpu = _device(num_gpus)[0] == "cuda"
    if tp > 1:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if on_gpu else ""
        if on_gpu and len([g for g in visible.split(",") if g.strip()]) < tp:
            raise RuntimeError(f"--lvlm-tp {tp}: this LVLM actor sees GPUs {visible!r}, needs {tp}")
        addr = ray.util.get_node_ip_address()
        port = free_port(addr)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        rank_actor = ray.remote(rank_class or LVLMRank).options(num_cpus=0, num_gpus=0, scheduling_strategy=here, max_restarts=0)
        helpers = [rank_actor.remote(cfg, r, addr, port, visible) for r in range(1, tp)]
    else:
        port = free_port(addr)
    init_rank(0, tp, master_addr=addr, master_port=port, backend="nccl" if on_gpu else "gloo")  # waits for helpers
    engine = load_engine(cfg, num_gpus, "LVLM tier (tp rank 0)", tp=tp)
    ray.get([h.ready.remote() for h in helpers])
    log.info("LVLM tier: tensor-parallel replica of %d rank(s) ready", tp)
    return engine, helpers


def _replica_broken(exc: BaseException) -> None:
    """A tp helper died: the process group is broken for good (NCCL would block rank 0 in its collective until
    the timeout; gloo fails every later batch). Exit, so that Ray Data restarts this replica (new helpers,
    new group) and retries the batch: answers, not error rows."""
    log.error("LVLM tier: a tensor-parallel helper rank died (%s); restarting the replica", _short(exc))
    os._exit(1)


def _watch_helpers(pending: list[Any], done: Any) -> None:
    """While rank 0 runs its forward, notice a helper's death at once (rank 0 may be blocked in a collective)."""
    import ray
    from ray.exceptions import RayActorError

    left = list(pending)
    while left and not done.is_set():
        ready, left = ray.wait(left, num_returns=1, timeout=0.5)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as exc:
                _replica_broken(exc)
            except Exception:  # noqa: BLE001 - the same inputs fail on rank 0 too: _check_helpers reports it
                pass


def _check_helpers(pending: list[Any]) -> None:
    """After rank 0's forward: every helper must have finished the same forward."""
    import ray
    from ray.exceptions import RayActorError

    try:
        ray.get(pending)
    except RayActorError as exc:
        _replica_broken(exc)


def generate_on_replica(engine, helpers: list[Any], cfg: JobConfig, inputs: dict[str, Any]):
    """Rank 0's ``generate`` with every helper running the same forward; a helper's death is noticed at once."""
    import threading

    pending = [h.generate.remote(inputs) for h in helpers]  # every rank runs the same forward
    done = threading.Event()
    watch = threading.Thread(target=_watch_helpers, args=(pending, done), daemon=True)
    watch.start()
    try:
        return lvlm_generate(engine, cfg, inputs)
    finally:
        done.set()
        watch.join()
        _check_helpers(pending)
