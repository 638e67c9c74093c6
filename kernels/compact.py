"""Compaction: gather the kept rows of hidden states and K/V caches into dense, shorter tensors.

After FastV-style pruning inside the LLM, the sequence dimension of the hidden states [B, L, D] and
of every layer's key/value cache [B, H, L, Dh] shrinks to the kept positions [B, L']. This is a pure
memory-bound gather, so the kernel is written for bandwidth: one program per (batch*head, block of
BLOCK_R output rows, block of BLOCK_D features), loads contiguous along D (vectorised when the
feature stride is 1), int64 addressing, dtype preserved (fp32 / bf16 / fp16 — no arithmetic).

``keep_idx`` rows may have different numbers of kept positions: pad with -1, and those output
slots are zero rows (the caller masks them in attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels._dispatch import check_kernel_device, launch, should_use_kernel

try:  # guarded: importing this module must work without triton (CPU-only installs)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """[B, L, D] -> [B, 1, L, D] view; [B, H, L, D] passes through."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        return x
    raise ValueError(f"x must be [B, L, D] or [B, H, L, D], got {tuple(x.shape)}")


def _check_idx(x4: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    if keep_idx.dim() != 2 or keep_idx.shape[0] != x4.shape[0]:
        raise ValueError(f"keep_idx must be [B, L'] with B={x4.shape[0]}, got {tuple(keep_idx.shape)}")
    if keep_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"keep_idx must be an integer tensor, got {keep_idx.dtype}")
    if keep_idx.numel() and bool(((keep_idx < -1) | (keep_idx >= x4.shape[2])).any()):
        raise IndexError(f"keep_idx values must lie in [-1, {x4.shape[2]})")
    return keep_idx.to(device=x4.device)


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


def _compact_rows_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,
    n_heads,
    n_out,
    dim,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_xd,
    stride_ib,
    stride_il,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads
    pid_r = tl.program_id(1)  # block of output rows
    pid_d = tl.program_id(2)  # block of features
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = offs_r < n_out
    mask_d = offs_d < dim
    src_row = tl.load(idx_ptr + b * stride_ib + offs_r * stride_il, mask=mask_r, other=-1).to(tl.int64)
    load_mask = (src_row >= 0)[:, None] & mask_d[None, :]
    src = x_ptr + b * stride_xb + h * stride_xh + src_row[:, None] * stride_xl + offs_d[None, :] * stride_xd
    vals = tl.load(src, mask=load_mask, other=0.0)
    # out is contiguous [B, H, n_out, dim]
    dst = out_ptr + (pid_bh.to(tl.int64) * n_out + offs_r[:, None]) * dim + offs_d[None, :]
    tl.store(dst, vals, mask=mask_r[:, None] & mask_d[None, :])


def _blocks(n_out: int, dim: int) -> tuple[int, int]:
    """~4K elements per program: wide along D for vector loads, a few rows when D is small."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), 512)
    block_r = min(max(1, 4096 // block_d), triton.next_power_of_2(max(n_out, 1)))
    return block_r, block_d


def compact_rows_triton(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    x4 = _as_4d(x)
    keep_idx = _check_idx(x4, keep_idx)
    check_kernel_device(x4, keep_idx)
    batch, n_heads, _, dim = x4.shape
    n_out = keep_idx.shape[1]
    out = torch.empty((batch, n_heads, n_out, dim), dtype=x.dtype, device=x.device)
    if out.numel():
        block_r, block_d = _blocks(n_out, dim)
        grid = (batch * n_heads, triton.cdiv(n_out, block_r), triton.cdiv(dim, block_d))
        launch(
            _compact_rows_kernel,
            grid,
            x4,
            keep_idx,
            out,
            n_heads,
            n_out,
            dim,
            x4.stride(0),
            x4.stride(1),
            x4.stride(2),
            x4.stride(3),
            keep_idx.stride(0),
            keep_idx.stride(1),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
    return out.squeeze(1) if x.dim() == 3 else out


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def compact_rows_reference(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    x4 = _as_4d(x)
    keep_idx = _check_idx(x4, keep_idx).long()
    batch, n_heads, _, dim = x4.shape
    pad = keep_idx < 0
    idx = keep_idx.clamp_min(0)[:, None, :, None].expand(batch, n_heads, -1, dim)
    out = x4.gather(2, idx).masked_fill(pad[:, None, :, None], 0)
    return out.squeeze(1) if x.dim() == 3 else out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def compact_rows(x: torch.Tensor, keep_idx: torch.Tensor, *, use_kernel: bool | None = None) -> torch.Tensor:
    """Gather ``x`` [B, L, D] or [B, H, L, D] along L at ``keep_idx`` [B, L'] (-1 = zero row).

    Returns a new contiguous [B, L', D] / [B, H, L', D] tensor of the same dtype.
    """
    if should_use_kernel(x, use_kernel):
        return compact_rows_triton(x, keep_idx)
    return compact_rows_reference(x, keep_idx)


def compact_kv(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    keep_idx: torch.Tensor,
    *,
    use_kernel: bool | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Compact every layer's ``(key, value)`` [B, H, L, Dh] with the same ``keep_idx``."""
    return [
        (compact_rows(k, keep_idx, use_kernel=use_kernel), compact_rows(v, keep_idx, use_kernel=use_kernel))
        for k, v in layers
    ]


def compact_cache_(cache, keep_idx: torch.Tensor, *, use_kernel: bool | None = None):
    """Compact a transformers ``DynamicCache`` in place (duck-typed: ``cache.layers[i].keys/.values``).

    Layers that hold no keys yet (e.g. after ``keep_idx`` was computed at an early layer) are skipped.
    """
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            continue
        layer.keys = compact_rows(keys, keep_idx, use_kernel=use_kernel)
        layer.values = compact_rows(layer.values, keep_idx, use_kernel=use_kernel)
    return cache


def keep_positions(
    kept_image_idx: torch.Tensor,
    image_start: int | torch.Tensor,
    image_len: int | torch.Tensor,
    seq_len: int | torch.Tensor,
) -> torch.Tensor:
    """Full-sequence positions to keep when only the image span is pruned (FastV), ascending.

    Row b keeps ``[0, start_b)``, ``start_b + kept_image_idx[b]`` (its -1 entries dropped) and
    ``[start_b + len_b, seq_len_b)``. Rows of different lengths are -1 padded to [B, L'max].
    """
    batch, _ = kept_image_idx.shape
    device = kept_image_idx.device

    def per_row(v) -> torch.Tensor:
        t = torch.as_tensor(v, device=device).to(torch.int64).reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t

    start, span, total = per_row(image_start), per_row(image_len), per_row(seq_len)
    if batch and bool(((start < 0) | (span < 0) | (start + span > total)).any()):
        raise ValueError("image span out of range of the sequence")
    if kept_image_idx.numel() and bool((kept_image_idx >= span[:, None]).any()):
        raise IndexError("kept_image_idx points past the image span")
    l_max = int(total.max().item()) if batch else 0
    pos = torch.arange(l_max, device=device).expand(batch, l_max)
    in_seq = pos < total[:, None]
    in_span = (pos >= start[:, None]) & (pos < (start + span)[:, None])
    keep = in_seq & ~in_span
    kept_abs = torch.where(kept_image_idx >= 0, kept_image_idx + start[:, None], l_max)
    # one spare column (index l_max) soaks up the -1 padding of kept_image_idx
    kept_mask = torch.zeros((batch, l_max + 1), dtype=torch.bool, device=device).scatter_(1, kept_abs, True)
    keep = keep | kept_mask[:, :l_max]
    width = int(keep.sum(1).max().item()) if batch else 0
    out = torch.where(keep, pos, l_max).sort(dim=1).values[:, :width]
    return out.masked_fill(out == l_max, -1)
