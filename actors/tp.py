"""Tensor-parallel LVLM for models too large for one GPU: a thin wrapper over ``deepspeed.init_inference``.

DeepSpeed's AutoTP splits every ``nn.Linear`` of the LLaMA decoder column- or row-wise over ``tp``
ranks and inserts the all-reduces; the CLIP tower and the projector stay replicated (they are small).
Each rank is one process on one GPU and runs the *same* forward on the *same* inputs: the caller
starts ``tp`` processes, calls ``init_rank`` in each (same address and port, ranks 0..tp-1), then
``shard_model`` on the loaded model, and feeds every rank the same batches.

In the main job (``--lvlm-tp N``, ``pipeline/lvlm_tier.py``): each LVLM-tier replica is one Ray Data
actor holding N GPUs of one node; it is rank 0, picks a free port (``free_port``) and its node's
address, and starts N-1 helper Ray actors (``LVLMRank``) pinned to its node that see the same GPUs,
use ``cuda:<rank>``, join the group, shard the same model and run the same ``generate`` on the same
inputs each batch; rank 0 returns the answers.

On a cluster without GPUs the same path runs CPU ranks over gloo (DeepSpeed's AutoTP supports CPU
inference; ``cpu_gloo_setup``). That is how it is tested: tp=1 alone (tests/test_infra.py), and tp=1 and
tp=2 through the main job (tests/test_job_tp.py: same answers row by row as without the flag). The NCCL
collectives of tp > 1 on GPUs are the one part that cannot run here. See docs/notes/sweep.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def init_rank(
    rank: int = 0,
    world_size: int = 1,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    backend: str | None = None,
) -> None:
    """Join (or create) the process group of a tp group; a no-op when one exists already.

    ``backend`` defaults to NCCL on CUDA and gloo otherwise, and DeepSpeed's accelerator follows it
    (the jobs default ``DS_ACCELERATOR`` to ``cpu`` for the CPU-only development machines).
    """
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "deepspeed" not in sys.modules:  # DeepSpeed picks its accelerator once, at import
        os.environ["DS_ACCELERATOR"] = "cuda" if backend == "nccl" else "cpu"
    import deepspeed

    if backend == "gloo":
        cpu_gloo_setup()
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def cpu_gloo_setup() -> None:
    """Skip DeepSpeed's CPU shared-memory all-reduce op for gloo process groups.

    DeepSpeed JIT-builds that op (ninja, ~30 s) on first use. With tp=2 AutoTP on this machine's CPUs, every
    rank then died with SIGSEGV; without it, gloo does the all-reduces and the sharded logits match the plain
    model's to 1.5e-7. The op is only a speed-up for multi-rank CPU jobs.
    """
    import importlib

    # importlib: `import deepspeed.comm.torch` would bind the `torch` name that deepspeed.comm re-exports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def shard_model(model: torch.nn.Module, tp: int, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``model`` with its linear layers split over ``tp`` ranks (AutoTP, no kernel injection).

    Returns the wrapped module itself (not DeepSpeed's engine), so callers keep using the transformers
    API (``model.model.language_model``, ``generate``). Needs ``init_rank`` first when ``tp > 1``.
    """
    import deepspeed

    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp > world:
        raise ValueError(f"tp={tp} needs {tp} ranks; this process group has {world} (call init_rank)")
    dtype = dtype or next(model.parameters()).dtype
    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False
    )
    return engine.module


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (rank 0 binds it as the process group's store right after)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tp_plan(params: float, gpu_memory_gib: float, *, bytes_per_param: int = 2, headroom: float = 0.7) -> int:
    """Smallest power-of-two tp degree whose per-GPU weight share fits ``headroom`` of the GPU memory.

    Weights only: the KV cache and activations of short VQA prompts are small next to them.
    """
    need = params * bytes_per_param / 2**30
    tp = 1
    while need / tp > headroom * gpu_memory_gib:
        tp *= 2
        if tp > 64:
            raise ValueError("model does not fit 64 GPUs of this size")
    return tp


def describe(model: Any) -> str:
    """Short text for logs: the tp degree a module was sharded with, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{type(model).__name__} over {world} rank(s)"
