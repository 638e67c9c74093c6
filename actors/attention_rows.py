"""Attention supervision without eager attention maps: the rows the loss needs, recomputed for those rows only.

The proving-ground LVLMs learn to select objects with an auxiliary loss on a few attention rows of a few LLM
layers (``attention_target_loss`` below). Asking the model for its attention maps forces eager
attention in every layer and stores [B, H, L, L] per layer; on the v2 LVLM (L ~ 330) that made a training step
~1.5x slower than SDPA. ``AttentionCapture`` lets the forward run with any kernel and keeps the inputs of the
supervised layers' self-attention; ``rows`` then recomputes, with eager's formula (``modeling_llama``
``eager_attention_forward``: RoPE'd q.k^T x scaling + mask, float32 softmax), only the rows that have targets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def target_nll(picked: Tensor, targets: list[tuple[int, int, list[int]]], weights: Tensor | None = None) -> Tensor:
    """Mean over targets of the mean over heads and target keys of -log p. ``picked``: [T, heads, L], the
    attention row of each target (``(row, query, keys)``) in order; ``weights`` [T] scale each target's term
    (the mean is still over the T targets)."""
    dev = picked.device
    width = max(len(t[2]) for t in targets)
    keys = torch.zeros((len(targets), width), dtype=torch.long, device=dev)
    valid = torch.zeros((len(targets), width), dtype=torch.bool, device=dev)
    for i, (_, _, k) in enumerate(targets):
        keys[i, : len(k)] = torch.tensor(k, dtype=torch.long)
        valid[i, : len(k)] = True
    probs = picked.gather(-1, keys[:, None, :].expand(-1, picked.shape[1], -1))  # [T, heads, width]
    logp = torch.log(probs.clamp_min(1e-6)) * valid[:, None, :]
    per_target = -logp.sum(-1).sum(-1) / (valid.sum(-1) * picked.shape[1])
    return (per_target if weights is None else per_target * weights.to(per_target)).mean()


class AttentionCapture:
    """Context manager: during a forward, keep the self-attention inputs of the given LLaMA layers.

    >>> with AttentionCapture(model.model.language_model, {2, 3, 4}) as cap:
    ...     logits = model(...)
    >>> rows = cap.rows(2, targets, heads=4)  # [T, 4, L], differentiable
    """

    def __init__(self, llm, layers: set[int]):
        self.llm = llm
        self.layers = sorted(layers)
        self.inputs: dict[int, dict] = {}
        self._handles: list = []

    def __enter__(self) -> AttentionCapture:
        for i in self.layers:
            def hook(module, args, kwargs, i=i):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                self.inputs[i] = {"hidden": hidden, "rope": kwargs["position_embeddings"],
                                  "mask": kwargs.get("attention_mask")}
            self._handles.append(self.llm.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def rows(self, layer: int, targets: list[tuple[int, int, list[int]]], heads: int) -> Tensor:
        """[T, heads, L] softmaxed attention of the first ``heads`` heads at each target's (row, query)."""
        attn = self.llm.layers[layer].self_attn
        got = self.inputs[layer]
        hidden, (cos, sin), mask = got["hidden"], got["rope"], got["mask"]
        rows = torch.tensor([t[0] for t in targets], device=hidden.device)
        queries = torch.tensor([t[1] for t in targets], device=hidden.device)
        hd, rep = attn.head_dim, attn.num_key_value_groups
        groups = -(-heads // rep)  # the KV groups the supervised heads read
        q = attn.q_proj(hidden[rows, queries]).view(len(targets), -1, hd)[:, :heads]  # [T, heads, hd]
        k = attn.k_proj(hidden).view(hidden.shape[0], hidden.shape[1], -1, hd)[:, :, :groups]  # [B, L, g, hd]
        q = q * cos[rows, queries][:, None] + _rotate_half(q) * sin[rows, queries][:, None]
        k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
        k = k[rows].repeat_interleave(rep, dim=2)[:, :, :heads]  # [T, L, heads, hd]
        scores = torch.einsum("thd,tlhd->thl", q, k) * attn.scaling
        if mask is not None:
            m = mask[rows, 0, queries, : scores.shape[-1]]
            if m.dtype == torch.bool:
                m = torch.zeros_like(m, dtype=scores.dtype).masked_fill(~m, torch.finfo(scores.dtype).min)
            scores = scores + m[:, None, :]
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)


def attention_target_loss(attention: Tensor, targets: list[tuple[int, int, list[int]]], heads: int) -> Tensor:
    """Auxiliary training loss that teaches the LLM to *select*: the first ``heads`` heads of one layer
    should spread their attention at each query position uniformly over its target keys
    (``PackedBatch.word_targets``, ``context_targets`` or ``hop_targets``): cross-entropy against that uniform distribution,
    averaged over heads and queries. ``attention`` is the layer's softmaxed map ``[B, H, L, L]``.

    Why: without it the LLM sat at chance on multi-object scenes for thousands of steps, even with ideal
    visual tokens (embeddings of colour + shape + cell) -- the answer loss alone gives the question-to-object
    match almost no gradient while attention is uniform over ~80 tokens. It exists only in training; the
    model stays a plain LLaVA.
    """
    if not targets:
        return attention.new_zeros(())
    rows = torch.tensor([t[0] for t in targets], device=attention.device)
    queries = torch.tensor([t[1] for t in targets], device=attention.device)
    return target_nll(attention[rows, :heads, queries], targets)  # one gather for all targets


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
