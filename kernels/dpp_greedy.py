"""Greedy MAP inference for a DPP (Chen, Zhang & Zhou, NeurIPS 2018: incremental Cholesky), one step at a time.

CDPruner (``actors/cdpruner.py``) keeps ``k`` visual tokens by greedily maximising ``log det L_S`` of a
kernel ``L`` [B, N, N]. Chen et al.'s fast greedy keeps, per row, the state

- ``cis`` [B, T, N] float32: row ``t`` is the ``t``-th row of the incremental Cholesky factor, i.e.
  ``c_t[n] = (L[j_t, n] - sum_{s<t} c_s[j_t] c_s[n]) / sqrt(d2[j_t])``;
- ``d2`` [B, N] float32: the marginal gain ``d2[n] = det(L_{S+n}) / det(L_S)`` of adding token ``n``
  (``-inf`` once ``n`` is selected);

and one step does, as in CDPruner's ``llava/model/llava_arch.py:173-181`` (Theia-4869/CDPruner):

1. ``j = argmax_n d2[n]`` (line 174) — ties -> lower index (``torch.argmax`` returns the first maximum),
   NaN counts as -inf;
2. ``e = (L[j, :] - sum_{t<i} cis[t, j] * cis[t, :]) / sqrt(d2[j])`` (lines 177-178), stored as
   ``cis[i]`` (line 179);
3. ``d2 -= e**2`` (line 180) and ``d2[j] = -inf`` (line 181).

One guard the public code does not have: when ``d2[j] <= eps`` (the kernel's rank is exhausted, e.g.
exact duplicate tokens), CDPruner's ``sqrt`` of a non-positive number makes every gain NaN; here
``e = 0`` instead, so the remaining gains are left as they are and the picks stay unique. With a
full-rank kernel (the normal case) the two agree.

Kernel: one program per batch row, two passes over N in blocks of BLOCK — a running (max, lowest index)
reduction for the argmax, then the Cholesky row update, whose inner loop over the ``i`` earlier rows runs
in index order. Dispatch as in ``kernels/_dispatch.py`` (CUDA -> kernel, CPU -> reference).
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

DEFAULT_EPS = 1e-12


def _check_state(
    kernel: torch.Tensor, cis: torch.Tensor, d2: torch.Tensor, step: int, selected: torch.Tensor
) -> None:
    if kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must be [B, N, N], got {tuple(kernel.shape)}")
    batch, n, _ = kernel.shape
    if cis.dim() != 3 or cis.shape[0] != batch or cis.shape[2] != n:
        raise ValueError(f"cis must be [B, T, N] = [{batch}, T, {n}], got {tuple(cis.shape)}")
    if d2.shape != (batch, n):
        raise ValueError(f"d2 must be [B, N] = [{batch}, {n}], got {tuple(d2.shape)}")
    if selected.dim() != 2 or selected.shape[0] != batch or selected.dtype != torch.int64:
        raise ValueError("selected must be int64 [B, T]")
    if not 0 <= step < min(cis.shape[1], selected.shape[1]):
        raise ValueError(f"step {step} out of range for T = {cis.shape[1]}")
    if cis.dtype != torch.float32 or d2.dtype != torch.float32:
        raise ValueError("cis and d2 must be float32")


def dpp_greedy_init(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """State for ``k`` greedy steps: ``cis`` zeros [B, k, N], ``d2 = diag(L)`` [B, N], ``selected`` [B, k]."""
    batch, n, _ = kernel.shape
    cis = torch.zeros((batch, k, n), dtype=torch.float32, device=kernel.device)
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).float().clone()  # llava_arch.py:171
    selected = torch.zeros((batch, k), dtype=torch.int64, device=kernel.device)
    return cis, d2, selected


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


def _dpp_step_kernel(
    l_ptr,
    cis_ptr,
    d2_ptr,
    sel_ptr,
    step,
    n,
    t_max,
    eps,
    stride_lb,
    stride_lr,
    stride_lc,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    d_row = d2_ptr + pid_b.to(tl.int64) * n
    cis_row = cis_ptr + pid_b.to(tl.int64) * t_max * n
    # pass 1: argmax of the gains, ties -> lower index, NaN -> -inf
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for n0 in range(0, n, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < n
        v = tl.load(d_row + offs, mask=valid, other=float("-inf"))
        v = tl.where(v != v, float("-inf"), v)
        m = tl.max(v, axis=0)
        cand = tl.min(tl.where(valid & (v == m), offs, n), axis=0)
        take = m > best  # strict: an equal maximum in a later block keeps the lower index
        best_idx = tl.where(take, cand, best_idx)
        best = tl.where(take, m, best)
    tl.store(sel_ptr + pid_b.to(tl.int64) * t_max + step, best_idx.to(tl.int64))
    d_j = tl.load(d_row + best_idx)
    inv = tl.where(d_j > eps, 1.0 / tl.sqrt(tl.maximum(d_j, eps)), 0.0)
    l_row = l_ptr + pid_b.to(tl.int64) * stride_lb + best_idx.to(tl.int64) * stride_lr
    # pass 2: e = (L[j, :] - sum_t cis[t, j] cis[t, :]) * inv ; cis[step] = e ; d2 -= e^2 ; d2[j] = -inf
    for n0 in range(0, n, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < n
        acc = tl.load(l_row + offs * stride_lc, mask=valid, other=0.0).to(tl.float32)
        for t in range(0, step):
            c_tj = tl.load(cis_row + t * n + best_idx)
            c_t = tl.load(cis_row + t * n + offs, mask=valid, other=0.0)
            acc -= c_tj * c_t
        e = acc * inv
        tl.store(cis_row + step * n + offs, e, mask=valid)
        d = tl.load(d_row + offs, mask=valid, other=0.0)
        d = d - e * e
        d = tl.where(offs == best_idx, float("-inf"), d)
        tl.store(d_row + offs, d, mask=valid)


def dpp_greedy_step_triton(
    kernel: torch.Tensor,
    cis: torch.Tensor,
    d2: torch.Tensor,
    step: int,
    selected: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    block: int | None = None,
) -> None:
    """``block`` (a power of two) overrides the tile width over N (tests use it to cross tiles at small N)."""
    check_kernel_device(kernel, cis, d2, selected)
    _check_state(kernel, cis, d2, step, selected)
    if not (cis.is_contiguous() and d2.is_contiguous() and selected.is_contiguous()):
        raise ValueError("cis, d2 and selected must be contiguous")
    if selected.shape[1] != cis.shape[1]:
        raise ValueError("selected and cis must have the same T")
    batch, n, _ = kernel.shape
    if batch == 0 or n == 0:
        return
    block = block or min(triton.next_power_of_2(n), 1024)
    launch(
        _dpp_step_kernel,
        (batch,),
        kernel,
        cis,
        d2,
        selected,
        step,
        n,
        cis.shape[1],
        eps,
        kernel.stride(0),
        kernel.stride(1),
        kernel.stride(2),
        BLOCK=block,
    )


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def dpp_greedy_step_reference(
    kernel: torch.Tensor,
    cis: torch.Tensor,
    d2: torch.Tensor,
    step: int,
    selected: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
) -> None:
    _check_state(kernel, cis, d2, step, selected)
    batch = kernel.shape[0]
    rows = torch.arange(batch, device=kernel.device)
    gains = torch.nan_to_num(d2, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    j = torch.argmax(gains, dim=-1)  # first maximum -> lower index on ties (llava_arch.py:174)
    selected[:, step] = j
    d_j = d2[rows, j]
    inv = torch.where(d_j > eps, d_j.clamp_min(eps).rsqrt(), torch.zeros_like(d_j))
    prev = cis[:, :step]  # [B, step, N]
    c_j = prev.gather(2, j.view(batch, 1, 1).expand(batch, step, 1))  # [B, step, 1]
    proj = torch.bmm(c_j.transpose(1, 2), prev).squeeze(1)  # [B, N]; llava_arch.py:177 (einsum there)
    e = (kernel[rows, j].float() - proj) * inv.unsqueeze(-1)  # llava_arch.py:177-178
    cis[:, step] = e  # llava_arch.py:179
    d2.sub_(e * e)  # llava_arch.py:180
    d2[rows, j] = float("-inf")  # llava_arch.py:181


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def dpp_greedy_step(
    kernel: torch.Tensor,
    cis: torch.Tensor,
    d2: torch.Tensor,
    step: int,
    selected: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    use_kernel: bool | None = None,
) -> None:
    """Greedy step ``step`` in place: pick ``argmax d2`` into ``selected[:, step]``, write ``cis[:, step]``, update ``d2``."""
    if should_use_kernel(kernel, use_kernel):
        dpp_greedy_step_triton(kernel, cis, d2, step, selected, eps=eps)
    else:
        dpp_greedy_step_reference(kernel, cis, d2, step, selected, eps=eps)


def dpp_greedy_map(
    kernel: torch.Tensor, k: int, *, eps: float = DEFAULT_EPS, use_kernel: bool | None = None
) -> torch.Tensor:
    """``k`` greedy steps on ``kernel`` [B, N, N] (requires ``k <= N``); picks in selection order, int64 [B, k]."""
    n = kernel.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, N = {n}], got {k}")
    cis, d2, selected = dpp_greedy_init(kernel, k)
    for step in range(k):
        dpp_greedy_step(kernel, cis, d2, step, selected, eps=eps, use_kernel=use_kernel)
    return selected
