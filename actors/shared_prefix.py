"""The selector's text encoder with the candidates' common prefix computed once per item.

ACCM's selector encodes every candidate as one text ("{q} {c}" here): N candidates repeat the question N times.
CLIP's text transformer is causal, so the hidden states of a token prefix shared by all of an item's candidates
do not depend on what follows: run the prefix once, then each candidate's suffix attending to the prefix's keys
and values of every layer (a KV cache). The EOS features are those of the plain forward (a test checks it), at
``prefix + N * suffix`` tokens instead of ``N * (prefix + suffix)``; ``pipeline.flops.selector_flops`` prices it
with ``shared_prefix_tokens``. Attention is written out (eager's formula) so that FlopCounterMode sees it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares, leaving each row at least its last token (its EOS)."""
    n = min(len(r) for r in rows) - 1
    p = 0
    while p < n and all(r[p] == rows[0][p] for r in rows):
        p += 1
    return p


def _attention(attn, q_in: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """CLIPAttention's output for queries ``q_in`` [B, S, d] over given keys/values [B, H, L, hd]; ``mask``
    additive [B, 1, S, L]."""
    b, s, d = q_in.shape
    heads = attn.num_heads
    q = attn.q_proj(q_in).view(b, s, heads, d // heads).transpose(1, 2)
    w = (q @ k.transpose(-2, -1)) * attn.scale + mask
    out = (w.float().softmax(-1).to(q.dtype) @ v).transpose(1, 2).reshape(b, s, d)
    return attn.out_proj(out)


def _kv(attn, x: Tensor) -> tuple[Tensor, Tensor]:
    b, n, d = x.shape
    heads = attn.num_heads
    return (attn.k_proj(x).view(b, n, heads, d // heads).transpose(1, 2),
            attn.v_proj(x).view(b, n, heads, d // heads).transpose(1, 2))


@torch.no_grad()
def shared_prefix_features(text_encoder, rows: list[list[int]], group: int) -> tuple[Tensor, list[int], int]:
    """EOS text embeddings [len(rows), proj] of a ``CLIPTextModelWithProjection`` for token ``rows`` that come in
    groups of ``group`` (one item's candidates, each ending with its EOS), and per group the shared prefix length
    and the padded suffix length of the batch (what was computed)."""
    model = text_encoder.text_model
    device = text_encoder.text_projection.weight.device
    groups = [rows[i:i + group] for i in range(0, len(rows), group)]
    prefix_lens = [common_prefix(g) for g in groups]
    out = []
    suffix_width = 0
    neg = torch.finfo(text_encoder.text_projection.weight.dtype).min
    for g, p in zip(groups, prefix_lens, strict=True):
        suffixes = [r[p:] for r in g]
        s = max(len(x) for x in suffixes)
        suffix_width = max(suffix_width, s)
        ids = torch.zeros(len(g), s, dtype=torch.long, device=device)
        for i, x in enumerate(suffixes):
            ids[i, : len(x)] = torch.tensor(x)
        lengths = torch.tensor([len(x) for x in suffixes], device=device)
        pre = model.embeddings(input_ids=torch.tensor([g[0][:p]], device=device)) if p else None
        h = model.embeddings(input_ids=ids, position_ids=torch.arange(p, p + s, device=device)[None].expand(len(g), -1))
        causal = torch.full((s, s), neg, device=device).triu(1)
        pad = torch.where(torch.arange(s, device=device)[None, :] < lengths[:, None], 0.0, neg)  # [N, S] keys
        mask = (causal[None] + pad[:, None, :])[:, None]  # [N, 1, S, S]
        if p:
            mask = torch.cat([mask.new_zeros(len(g), 1, s, p), mask], dim=-1)
            pre_mask = torch.full((p, p), neg, device=device).triu(1)[None, None]
        for layer in model.encoder.layers:
            attn = layer.self_attn
            x = layer.layer_norm1(h)
            k, v = _kv(attn, x)
            if p:
                xp = layer.layer_norm1(pre)
                kp, vp = _kv(attn, xp)
                pre = pre + _attention(attn, xp, kp, vp, pre_mask)
                pre = pre + layer.mlp(layer.layer_norm2(pre))
                k = torch.cat([kp.expand(len(g), -1, -1, -1), k], dim=2)
                v = torch.cat([vp.expand(len(g), -1, -1, -1), v], dim=2)
            h = h + _attention(attn, x, k, v, mask)
            h = h + layer.mlp(layer.layer_norm2(h))
        eos = model.final_layer_norm(h[torch.arange(len(g), device=device), lengths - 1])
        out.append(text_encoder.text_projection(eos))
    return torch.cat(out), prefix_lens, suffix_width
