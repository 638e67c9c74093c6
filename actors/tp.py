"""Tensor-parallel LVLM for models too large for one GPU: a thin wrapper over ``deepspeed.init_inference``.

DeepSpeed's AutoTP splits every ``nn.Linear`` of the LLaMA decoder column- or row-wise over ``tp``
ranks and inserts the all-reduces; the CLIP tower and the projector stay replicated (they are small).
Each rank is one process on one GPU and runs the *same* forward on the *same* inputs: the caller
starts ``tp`` processes (on Ray: ``tp`` actors of 1 GPU each in one STRICT_PACK placement group, rank 0
returning the answers), calls ``init_rank`` in each, then ``shard_model`` on the loaded model.

Status: ``init_rank`` + ``shard_model`` are tested at tp=1 on CPU (gloo), where DeepSpeed injects
nothing and the outputs must be identical to the plain model. tp > 1 needs several GPUs and NCCL and
is not tested here; the main job does not yet expose ``--lvlm-tp`` (its LVLM tier is one actor per
model replica). See docs/notes/sweep.md.
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

    ``backend`` defaults to NCCL on CUDA and gloo otherwise (DeepSpeed's CPU accelerator).
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


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
