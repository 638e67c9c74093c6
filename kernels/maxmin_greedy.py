"""Greedy max-min diversity selection (DivPrune), one step at a time.

DivPrune (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py:152-171``) picks ``k`` tokens from a distance
matrix ``dist`` [B, N, N] (``1 - cosine``): the first pick is the token whose nearest neighbour is
farthest (lines 164-165: the second-smallest entry of each column, the smallest being the token's own
~0 self-distance), and each later pick maximises the distance to the nearest already-picked token
(lines 162, 167, 169: min over the picked rows of each column, then argmax).

The public code recomputes that min over all ``i`` picked rows at step ``i``; here the running min
``mind`` [B, N] float32 is kept instead, so one step is O(N):

1. ``mind = minimum(mind, dist[prev, :])`` with ``prev`` the previous pick, and ``mind[prev] = -inf``;
2. ``j = argmax mind`` — ties -> lower index (``torch.argmax`` returns the first maximum, line 169),
   NaN counts as -inf.

Same picks as the code, with one difference only in a degenerate case: the code does not exclude
already-picked tokens, which then score their self-distance (~0); when every remaining token is an
exact duplicate of a picked one, the code can pick an index twice, while here picked tokens are
``-inf`` so the output is always ``k`` distinct tokens.

Kernel: one program per batch row, a single pass over N in blocks of BLOCK fusing the min update and
a running (max, lowest index) argmax. Dispatch as in ``kernels/_dispatch.py``.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check_kernel_device, launch, should_use_kernel

try:  # guarded: importing this module must work without triton (CPU-only installs)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def _check_state(dist: torch.Tensor, mind: torch.Tensor, step: int, selected: torch.Tensor) -> None:
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2]:
        raise ValueError(f"dist must be [B, N, N], got {tuple(dist.shape)}")
    batch, n, _ = dist.shape
    if mind.shape != (batch, n) or mind.dtype != torch.float32:
        raise ValueError(f"mind must be float32 [B, N] = [{batch}, {n}]")
    if selected.dim() != 2 or selected.shape[0] != batch or selected.dtype != torch.int64:
        raise ValueError("selected must be int64 [B, T]")
    if not 1 <= step < selected.shape[1]:
        raise ValueError(f"step must lie in [1, T = {selected.shape[1]}), got {step}")


def _first_pick(dist: torch.Tensor) -> torch.Tensor:
    """argmax over columns of the 2nd-smallest column entry (llava_arch.py:165, 169); needs N >= 2."""
    nearest = torch.topk(dist.float(), 2, dim=-2, largest=False).values[:, 1, :]  # [B, N]
    nearest = torch.nan_to_num(nearest, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.argmax(nearest, dim=-1)


def maxmin_greedy_init(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mind`` (+inf) [B, N] and ``selected`` [B, k] with the first pick in column 0 (k >= 1, N >= 2)."""
    batch, n, _ = dist.shape
    mind = torch.full((batch, n), float("inf"), dtype=torch.float32, device=dist.device)
    selected = torch.zeros((batch, k), dtype=torch.int64, device=dist.device)
    if k > 0:
        selected[:, 0] = _first_pick(dist)
    return mind, selected


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


def _maxmin_step_kernel(
    dist_ptr,
    mind_ptr,
    sel_ptr,
    step,
    n,
    t_max,
    stride_db,
    stride_dr,
    stride_dc,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    sel_row = sel_ptr + pid_b.to(tl.int64) * t_max
    prev = tl.load(sel_row + step - 1)
    d_row = dist_ptr + pid_b.to(tl.int64) * stride_db + prev * stride_dr
    m_row = mind_ptr + pid_b.to(tl.int64) * n
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for n0 in range(0, n, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < n
        dist = tl.load(d_row + offs * stride_dc, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(m_row + offs, mask=valid, other=float("-inf"))
        m = tl.where(dist < m, dist, m)
        m = tl.where(offs == prev, float("-inf"), m)
        tl.store(m_row + offs, m, mask=valid)
        v = tl.where(valid & (m == m), m, float("-inf"))
        top = tl.max(v, axis=0)
        cand = tl.min(tl.where(valid & (v == top), offs, n), axis=0)
        take = top > best  # strict: an equal maximum in a later block keeps the lower index
        best_idx = tl.where(take, cand, best_idx)
        best = tl.where(take, top, best)
    tl.store(sel_row + step, best_idx.to(tl.int64))


def maxmin_greedy_step_triton(
    dist: torch.Tensor, mind: torch.Tensor, step: int, selected: torch.Tensor, *, block: int | None = None
) -> None:
    """``block`` (a power of two) overrides the tile width over N (tests use it to cross tiles at small N)."""
    check_kernel_device(dist, mind, selected)
    _check_state(dist, mind, step, selected)
    if not (mind.is_contiguous() and selected.is_contiguous()):
        raise ValueError("mind and selected must be contiguous")
    batch, n, _ = dist.shape
    if batch == 0 or n == 0:
        return
    block = block or min(triton.next_power_of_2(n), 1024)
    launch(
        _maxmin_step_kernel,
        (batch,),
        dist,
        mind,
        selected,
        step,
        n,
        selected.shape[1],
        dist.stride(0),
        dist.stride(1),
        dist.stride(2),
        BLOCK=block,
    )


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def maxmin_greedy_step_reference(
    dist: torch.Tensor, mind: torch.Tensor, step: int, selected: torch.Tensor
) -> None:
    _check_state(dist, mind, step, selected)
    rows = torch.arange(dist.shape[0], device=dist.device)
    prev = selected[:, step - 1]
    row = dist[rows, prev].float()  # [B, N]: distances from the previous pick (llava_arch.py:162)
    mind.copy_(torch.where(row < mind, row, mind))  # running min over picks (llava_arch.py:167)
    mind[rows, prev] = float("-inf")
    gains = torch.nan_to_num(mind, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    selected[:, step] = torch.argmax(gains, dim=-1)  # first maximum (llava_arch.py:169)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def maxmin_greedy_step(
    dist: torch.Tensor,
    mind: torch.Tensor,
    step: int,
    selected: torch.Tensor,
    *,
    use_kernel: bool | None = None,
) -> None:
    """Step ``step >= 1`` in place: fold ``dist[selected[:, step-1]]`` into ``mind``, pick into ``selected[:, step]``."""
    if should_use_kernel(dist, use_kernel):
        maxmin_greedy_step_triton(dist, mind, step, selected)
    else:
        maxmin_greedy_step_reference(dist, mind, step, selected)


def maxmin_greedy(dist: torch.Tensor, k: int, *, use_kernel: bool | None = None) -> torch.Tensor:
    """``k`` max-min picks on ``dist`` [B, N, N] (``k <= N``, N >= 2 when k >= 1); selection order, int64 [B, k]."""
    n = dist.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, N = {n}], got {k}")
    if k == 0:
        return torch.zeros((dist.shape[0], 0), dtype=torch.int64, device=dist.device)
    if n < 2:
        return torch.zeros((dist.shape[0], k), dtype=torch.int64, device=dist.device)
    mind, selected = maxmin_greedy_init(dist, k)
    for step in range(1, k):
        maxmin_greedy_step(dist, mind, step, selected, use_kernel=use_kernel)
    return selected
