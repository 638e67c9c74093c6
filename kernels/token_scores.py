"""Scoring of visual tokens: the first step of every pruning method.

Three scores, each as a Triton kernel, its launcher, a PyTorch reference and a dispatch function:

- ``head_mean_query_scores``: FastV — mean over heads of one query row's attention (the last prompt
  token at LLM layer K) restricted to each item's image span; padded spans are ``-inf``.
- ``cls_attention_scores``: VisionZip / PruMerge+ — CLS->patch attention of a vision layer, summed
  over heads.
- ``cosine_scores``: text-guided selection — cosine similarity of patch embeddings to a text embedding.

All scores are float32 whatever the input dtype (bf16/fp16 inputs are upcast when loaded), so that
top-k on them is reproducible across paths. Kernels accumulate over heads / features in index order.
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


def _per_row(v: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """An int or a [B] tensor -> int64 [B] on ``device``."""
    if isinstance(v, torch.Tensor):
        v = v.to(device=device, dtype=torch.int64).reshape(-1)
        if v.numel() == 1:
            v = v.expand(batch)
        if v.numel() != batch:
            raise ValueError(f"expected {batch} per-row values, got {v.numel()}")
        return v.contiguous()
    return torch.full((batch,), int(v), dtype=torch.int64, device=device)


def _query_rows(attn: torch.Tensor, query_index: int) -> torch.Tensor:
    """[B, H, Q, L] -> [B, H, L] view of one query row; [B, H, L] passes through."""
    if attn.dim() == 3:
        return attn
    if attn.dim() != 4:
        raise ValueError(f"attn must be [B, H, Q, L] or [B, H, L], got {tuple(attn.shape)}")
    return attn[:, :, query_index, :]


def _spans(attn_rows: torch.Tensor, image_start, image_len) -> tuple[torch.Tensor, torch.Tensor, int]:
    batch, _, length = attn_rows.shape
    start = _per_row(image_start, batch, attn_rows.device)
    span = _per_row(image_len, batch, attn_rows.device)
    if bool(((start < 0) | (span < 0) | (start + span > length)).any()):
        raise ValueError("image span out of range of the attention row")
    n_max = int(span.max().item()) if batch > 0 else 0
    return start, span, n_max


# ---------------------------------------------------------------------------------------------
# (a) head-mean attention of one query row over the image span (FastV)
# ---------------------------------------------------------------------------------------------


def _head_mean_query_kernel(
    attn_ptr,
    start_ptr,
    len_ptr,
    out_ptr,
    n_heads,
    n_max,
    stride_ab,
    stride_ah,
    stride_al,
    BLOCK_N: tl.constexpr,
):
    # One program per (batch item, block of image positions); heads are summed in a loop.
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(start_ptr + pid_b)
    span = tl.load(len_ptr + pid_b)
    valid = offs_n < span
    row_ptr = attn_ptr + pid_b.to(tl.int64) * stride_ab + (start + offs_n) * stride_al
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h in range(0, n_heads):
        acc += tl.load(row_ptr + h * stride_ah, mask=valid, other=0.0).to(tl.float32)
    scores = tl.where(valid, acc / n_heads, float("-inf"))
    tl.store(out_ptr + pid_b.to(tl.int64) * n_max + offs_n, scores, mask=offs_n < n_max)


def head_mean_query_scores_triton(
    attn: torch.Tensor, image_start, image_len, *, query_index: int = -1
) -> torch.Tensor:
    rows = _query_rows(attn, query_index)
    check_kernel_device(rows)
    start, span, n_max = _spans(rows, image_start, image_len)
    batch, n_heads, _ = rows.shape
    out = torch.empty((batch, n_max), dtype=torch.float32, device=rows.device)
    if batch == 0 or n_max == 0:
        return out
    block_n = min(triton.next_power_of_2(n_max), 1024)
    grid = (batch, triton.cdiv(n_max, block_n))
    launch(
        _head_mean_query_kernel,
        grid,
        rows,
        start,
        span,
        out,
        n_heads,
        n_max,
        rows.stride(0),
        rows.stride(1),
        rows.stride(2),
        BLOCK_N=block_n,
    )
    return out


def head_mean_query_scores_reference(
    attn: torch.Tensor, image_start, image_len, *, query_index: int = -1
) -> torch.Tensor:
    rows = _query_rows(attn, query_index)
    start, span, n_max = _spans(rows, image_start, image_len)
    mean = rows.float().mean(dim=1)  # [B, L]
    offs = torch.arange(n_max, device=rows.device)
    valid = offs[None, :] < span[:, None]
    pos = (start[:, None] + offs[None, :]).clamp(max=max(rows.shape[-1] - 1, 0))
    scores = mean.gather(1, pos) if n_max > 0 else mean[:, :0]
    return scores.masked_fill(~valid, float("-inf"))


def head_mean_query_scores(
    attn: torch.Tensor,
    image_start: int | torch.Tensor,
    image_len: int | torch.Tensor,
    *,
    query_index: int = -1,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Mean over heads of ``attn[b, :, query_index, image_start[b] + n]`` -> float32 [B, max(image_len)].

    ``attn`` is [B, H, Q, L] attention probabilities (or [B, H, L], one row already taken); positions
    past an item's ``image_len`` are ``-inf`` so they never win a top-k.
    """
    if should_use_kernel(attn, use_kernel):
        return head_mean_query_scores_triton(attn, image_start, image_len, query_index=query_index)
    return head_mean_query_scores_reference(attn, image_start, image_len, query_index=query_index)


# ---------------------------------------------------------------------------------------------
# (b) CLS attention summed over heads (VisionZip, PruMerge+)
# ---------------------------------------------------------------------------------------------


def _cls_attention_kernel(
    attn_ptr,
    out_ptr,
    n_heads,
    n_tokens,
    stride_ab,
    stride_ah,
    stride_an,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < n_tokens
    row_ptr = attn_ptr + pid_b.to(tl.int64) * stride_ab + offs_n * stride_an
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h in range(0, n_heads):
        acc += tl.load(row_ptr + h * stride_ah, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b.to(tl.int64) * n_tokens + offs_n, acc, mask=mask)


def _check_cls(attn: torch.Tensor) -> None:
    if attn.dim() != 3:
        raise ValueError(f"attn must be [B, H, N] (e.g. attn[:, :, 0, 1:]), got {tuple(attn.shape)}")


def cls_attention_scores_triton(attn: torch.Tensor) -> torch.Tensor:
    _check_cls(attn)
    check_kernel_device(attn)
    batch, n_heads, n_tokens = attn.shape
    out = torch.empty((batch, n_tokens), dtype=torch.float32, device=attn.device)
    if batch == 0 or n_tokens == 0:
        return out
    block_n = min(triton.next_power_of_2(n_tokens), 1024)
    grid = (batch, triton.cdiv(n_tokens, block_n))
    launch(
        _cls_attention_kernel,
        grid,
        attn,
        out,
        n_heads,
        n_tokens,
        attn.stride(0),
        attn.stride(1),
        attn.stride(2),
        BLOCK_N=block_n,
    )
    return out


def cls_attention_scores_reference(attn: torch.Tensor) -> torch.Tensor:
    _check_cls(attn)
    return attn.float().sum(dim=1)


def cls_attention_scores(attn: torch.Tensor, *, use_kernel: bool | None = None) -> torch.Tensor:
    """CLS->patch attention ``attn`` [B, H, N] summed over heads -> float32 [B, N]."""
    if should_use_kernel(attn, use_kernel):
        return cls_attention_scores_triton(attn)
    return cls_attention_scores_reference(attn)


# ---------------------------------------------------------------------------------------------
# (c) cosine similarity of patch embeddings to a text embedding (text-guided selection)
# ---------------------------------------------------------------------------------------------


def _cosine_kernel(
    x_ptr,
    t_ptr,
    out_ptr,
    n_tokens,
    dim,
    eps,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_tb,
    stride_td,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (batch item, block of patches); the feature dim is walked in BLOCK_D chunks
    # accumulating x.t, |x|^2 and |t|^2 in fp32.
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    x_row = x_ptr + pid_b.to(tl.int64) * stride_xb + offs_n[:, None] * stride_xn
    t_row = t_ptr + pid_b.to(tl.int64) * stride_tb
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        x = tl.load(x_row + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        x = x.to(tl.float32)
        t = tl.load(t_row + offs_d * stride_td, mask=mask_d, other=0.0).to(tl.float32)
        dot += tl.sum(x * t[None, :], axis=1)
        x_sq += tl.sum(x * x, axis=1)
        t_sq += t * t
    t_norm = tl.maximum(tl.sqrt(tl.sum(t_sq, axis=0)), eps)
    x_norm = tl.maximum(tl.sqrt(x_sq), eps)
    tl.store(out_ptr + pid_b.to(tl.int64) * n_tokens + offs_n, dot / (x_norm * t_norm), mask=mask_n)


def _check_cosine(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    if patches.dim() != 3:
        raise ValueError(f"patches must be [B, N, D], got {tuple(patches.shape)}")
    if text.dim() == 1:
        text = text.unsqueeze(0).expand(patches.shape[0], -1)
    if text.dim() != 2 or text.shape[0] != patches.shape[0] or text.shape[1] != patches.shape[2]:
        raise ValueError(
            f"text must be [B, D] or [D] matching patches {tuple(patches.shape)}, got {tuple(text.shape)}"
        )
    return text


def cosine_scores_triton(patches: torch.Tensor, text: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    text = _check_cosine(patches, text)
    check_kernel_device(patches, text)
    batch, n_tokens, dim = patches.shape
    out = torch.empty((batch, n_tokens), dtype=torch.float32, device=patches.device)
    if batch == 0 or n_tokens == 0:
        return out
    block_d = min(triton.next_power_of_2(max(dim, 1)), 128)
    block_n = min(triton.next_power_of_2(n_tokens), max(16, 8192 // block_d))
    grid = (batch, triton.cdiv(n_tokens, block_n))
    launch(
        _cosine_kernel,
        grid,
        patches,
        text,
        out,
        n_tokens,
        dim,
        eps,
        patches.stride(0),
        patches.stride(1),
        patches.stride(2),
        text.stride(0),
        text.stride(1),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out


def cosine_scores_reference(patches: torch.Tensor, text: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    text = _check_cosine(patches, text)
    x = patches.float()
    t = text.float()
    dot = (x * t[:, None, :]).sum(-1)
    x_norm = x.norm(dim=-1).clamp_min(eps)
    t_norm = t.norm(dim=-1).clamp_min(eps)
    return dot / (x_norm * t_norm[:, None])


def cosine_scores(
    patches: torch.Tensor, text: torch.Tensor, *, eps: float = 1e-8, use_kernel: bool | None = None
) -> torch.Tensor:
    """Cosine similarity of ``patches`` [B, N, D] to ``text`` [B, D] (or [D]) -> float32 [B, N].

    Defined as ``x.t / (max(|x|, eps) * max(|t|, eps))`` (the same as ``F.cosine_similarity``).
    """
    if should_use_kernel(patches, use_kernel):
        return cosine_scores_triton(patches, text, eps=eps)
    return cosine_scores_reference(patches, text, eps=eps)
