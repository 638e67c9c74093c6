"""Per-row top-k over variable-length spans, returned in position order.

Pruning keeps the ``k`` best-scoring visual tokens of each item but must hand them to the LLM in
their original order, and must also report the discarded ones (ACCM captions them). Both outputs are
ascending position lists, padded with -1 where rows differ in length.

Tie rule (identical in kernel and reference): a higher score wins; on equal scores the lower
position wins; NaN counts as -inf. With it the selection is a pure function of the scores, so the
kernel and reference paths pick exactly the same tokens.

Kernel, in two launches:

1. ``_rank_keep_kernel``, one program per (row, block of BLOCK_I positions): the rank of element i
   is the number of valid elements j that beat it (``s_j > s_i`` or ``s_j == s_i and j < i``),
   counted tile by tile over the row — O(N^2) compares per row, which is cheap for N <= 4096 and
   needs no sort. Element i is kept iff ``rank_i < min(k, len)``; a keep flag per position is written.
2. ``_scatter_kernel``, one program per row: walks the flags in blocks, and a running prefix sum
   (``tl.cumsum``) gives each kept / discarded position its output slot, so both lists come out
   ascending.
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


def _prepare(scores: torch.Tensor, k, lengths) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate; return per-row lengths, per-row effective k = min(k, len), and the output widths."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got {tuple(scores.shape)}")
    batch, n_max = scores.shape
    device = scores.device
    if lengths is None:
        lens = torch.full((batch,), n_max, dtype=torch.int64, device=device)
    else:
        lens = torch.as_tensor(lengths, device=device).to(torch.int64).reshape(-1)
        if lens.numel() != batch:
            raise ValueError(f"lengths must have {batch} entries, got {lens.numel()}")
    ks = torch.as_tensor(k, device=device).to(torch.int64).reshape(-1)
    if ks.numel() == 1:
        ks = ks.expand(batch)
    if ks.numel() != batch:
        raise ValueError(f"k must be a scalar or have {batch} entries, got {ks.numel()}")
    if batch and bool(((lens < 0) | (lens > n_max) | (ks < 0)).any()):
        raise ValueError("lengths must lie in [0, N] and k must be >= 0")
    kk = torch.minimum(ks, lens).contiguous()
    lens = lens.contiguous()
    k_width = int(kk.max().item()) if batch else 0
    d_width = int((lens - kk).max().item()) if batch else 0
    return lens, kk, k_width, d_width


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


def _rank_keep_kernel(
    s_ptr,
    len_ptr,
    k_ptr,
    keep_ptr,
    n_max,
    stride_sb,
    stride_sn,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_i = tl.program_id(1)
    n = tl.load(len_ptr + pid_b)
    k = tl.load(k_ptr + pid_b)
    row = s_ptr + pid_b.to(tl.int64) * stride_sb
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    valid_i = offs_i < n
    s_i = tl.load(row + offs_i * stride_sn, mask=valid_i, other=float("-inf")).to(tl.float32)
    s_i = tl.where(s_i != s_i, float("-inf"), s_i)  # NaN -> -inf
    rank = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        valid_j = offs_j < n
        s_j = tl.load(row + offs_j * stride_sn, mask=valid_j, other=float("-inf")).to(tl.float32)
        s_j = tl.where(s_j != s_j, float("-inf"), s_j)
        beats = (s_j[None, :] > s_i[:, None]) | (
            (s_j[None, :] == s_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
        )
        beats = beats & valid_j[None, :]
        rank += tl.sum(beats.to(tl.int32), axis=1)
    keep = valid_i & (rank < k)
    tl.store(keep_ptr + pid_b.to(tl.int64) * n_max + offs_i, keep.to(tl.int8), mask=offs_i < n_max)


def _scatter_kernel(
    keep_ptr,
    len_ptr,
    kept_ptr,
    disc_ptr,
    n_max,
    k_width,
    d_width,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    n = tl.load(len_ptr + pid_b)
    flags = keep_ptr + pid_b.to(tl.int64) * n_max
    kept_row = kept_ptr + pid_b.to(tl.int64) * k_width
    disc_row = disc_ptr + pid_b.to(tl.int64) * d_width
    n_kept = 0
    n_disc = 0
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        valid = offs < n
        keep = tl.load(flags + offs, mask=valid, other=0).to(tl.int32)
        disc = tl.where(valid, 1 - keep, 0)
        kept_slot = n_kept + tl.cumsum(keep, axis=0) - 1
        disc_slot = n_disc + tl.cumsum(disc, axis=0) - 1
        tl.store(kept_row + kept_slot, offs.to(tl.int64), mask=keep > 0)
        tl.store(disc_row + disc_slot, offs.to(tl.int64), mask=disc > 0)
        n_kept += tl.sum(keep, axis=0)
        n_disc += tl.sum(disc, axis=0)


def split_topk_triton(scores: torch.Tensor, k, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernel_device(scores)
    lens, kk, k_width, d_width = _prepare(scores, k, lengths)
    batch, n_max = scores.shape
    kept = torch.full((batch, k_width), -1, dtype=torch.int64, device=scores.device)
    disc = torch.full((batch, d_width), -1, dtype=torch.int64, device=scores.device)
    if batch == 0 or n_max == 0:
        return kept, disc
    keep = torch.empty((batch, n_max), dtype=torch.int8, device=scores.device)
    block_i = min(triton.next_power_of_2(n_max), 64)
    block_j = min(triton.next_power_of_2(n_max), 64)
    launch(
        _rank_keep_kernel,
        (batch, triton.cdiv(n_max, block_i)),
        scores,
        lens,
        kk,
        keep,
        n_max,
        scores.stride(0),
        scores.stride(1),
        BLOCK_I=block_i,
        BLOCK_J=block_j,
    )
    block = min(triton.next_power_of_2(n_max), 1024)
    launch(_scatter_kernel, (batch,), keep, lens, kept, disc, n_max, k_width, d_width, BLOCK=block)
    return kept, disc


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def _ascending_positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Positions of True entries per row, ascending, in [B, width], -1 padded."""
    n_max = mask.shape[1]
    pos = torch.arange(n_max, device=mask.device).expand_as(mask)
    pos = torch.where(mask, pos, n_max).sort(dim=1).values[:, :width]
    return pos.masked_fill(pos == n_max, -1)


def split_topk_reference(scores: torch.Tensor, k, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    lens, kk, k_width, d_width = _prepare(scores, k, lengths)
    batch, n_max = scores.shape
    s = scores.float()
    s = torch.where(torch.isnan(s), float("-inf"), s)
    offs = torch.arange(n_max, device=scores.device)
    valid = offs[None, :] < lens[:, None]
    # Padding is -inf and sits at higher positions than every valid element, so the stable
    # descending sort (equal scores keep position order = lower index first) ranks it last.
    s = s.masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, offs.expand(batch, n_max).contiguous())
    keep = valid & (rank < kk[:, None])
    return _ascending_positions(keep, k_width), _ascending_positions(valid & ~keep, d_width)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def split_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``min(k, len)`` positions of each row of ``scores`` [B, N] and the other valid positions.

    Returns ``(kept [B, Kmax], discarded [B, Mmax])`` int64, each ascending and -1 padded, where
    ``Kmax = max_b min(k_b, len_b)`` and ``Mmax = max_b (len_b - min(k_b, len_b))``. ``lengths`` [B]
    marks the valid prefix of each row (None: all N); ``k`` is a scalar or [B]. See the module
    docstring for the tie rule.
    """
    if should_use_kernel(scores, use_kernel):
        return split_topk_triton(scores, k, lengths)
    return split_topk_reference(scores, k, lengths)


def select_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """The kept half of :func:`split_topk`: ascending top-k positions [B, Kmax], -1 padded."""
    return split_topk(scores, k, lengths, use_kernel=use_kernel)[0]
