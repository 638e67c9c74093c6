"""DART (Wen et al., EMNLP'25, "Stop Looking for Important Tokens ... Duplication Matters More"): in-LLM
image-token selection by duplication with respect to a few pivot tokens.

Runs at the same point as FastV (``actors.fastv.LlamaDecoderRunner.prefill``): on the hidden states that
enter layer K, with layer K-1's key cache; from layer K on the hidden states and KV caches hold only the
kept image tokens (plus all text) with their original position ids.

Rules, as the public code does them. Sources (read, not copied):
  [L] ModelTC/llmc ``llmc/compression/token_reduction/dart.py`` @ 05eedff0 (re-implementation; line numbers
      below), config ``configs/sparsification/methods/DART/dart.yml`` (pruning_loc 2, max_num_trunction 128,
      pivot_image_token 4, pivot_text_token 4: the LLaVA-1.5 setting);
  [D] ZichenWen1/DART, LLaVA ``get_retained_image_token`` + ``DART_K_norm.forward`` (the authors' code, same
      rules; README: ``bash scripts/v1_5/eval/textvqa.sh 0.778 128``, scripts ``--pivot_image_token 4
      --pivot_text_token 4``).

1. Where: before layer K (default 2) runs, on layer K-1's output; layers >= K see the reduced sequence with
   the kept tokens' original position ids ([L] L172-L178 pre-hook on ``blocks[pruning_loc]``, L118-L132
   ``position_ids = keep_indexs``; [D] ``layer_idx == K``).
2. Pivot score: L1 norm of each token's *key* of layer K-1, post-RoPE, all heads concatenated
   ([L] L90-L94 keys after ``apply_rotary_pos_emb`` from layer K-1's cache, L163-L170; L196-L205
   ``torch.norm(p=1)`` over heads x head_dim; [D] ``K_states = layer_outputs[-2]``). [L] norms
   ``repeat_kv``'d keys (L94): every norm times the GQA group size, same ranking; we norm the cache as stored.
3. Pivots: the ``pivot_image`` image tokens of largest key norm *and* the ``pivot_text`` tokens of largest
   key norm among the text *after* the image (``[image_end:]``: question and answer prompt, not the system
   prompt before the image) ([L] L199-L215). LLaVA-1.5-7B: 4 + 4 ([L] dart.yml, [D] scripts).
4. Duplication: cosine similarity between the hidden states entering layer K after the model's *final*
   RMSNorm ([L] L112 ``normlayer(hidden_states)``, L176 ``model.norm``; [D] ``self.norm(layer_outputs[0])``).
   Candidates are the non-pivot image tokens ([L] L217-L219).
5. Greedy per pivot: each pivot in turn takes its ``TOKEN_TOPK`` *least* similar remaining candidates
   (``topk`` of ``-cos``), which leave the candidate pool ([L] L222-L235).
6. Kept: image pivots + everything the pivots took; text pivots are text and stay anyway
   ([L] L237 ``difference_update(query_indices)``).

Budget (``count``). The code sets ``TOKEN_TOPK = max_num_trunction // (pivot_image + pivot_text)``
([D] ``int(MAX_NUM_TRUNCTION // P)``; [L] L189-L193), so it keeps ``pivot_image + P * (budget // P)`` image tokens: 132 for the paper's
"128" with 4 + 4 pivots. ``count="code"`` (the default: the public code's behaviour) reproduces that, and the
job reports the count it kept. ``count="budget"`` (the paper's token counts, equal budgets across methods) keeps
exactly ``budget``: the image pivots count towards it and the rest is split over the pivots as evenly as
possible, the first pivots (in order) one more.

Pivot order. The code iterates a Python ``set`` of positions, whose order is an implementation artifact;
we take the pivots in ascending sequence position (image pivots first, they precede the text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.flops_pruners import dart_selection_flops as dart_flops  # noqa: F401 - the one FLOPs model

COUNTS = ("code", "budget")
DEFAULT_LAYER = 2  # [S] --pruned_layer / K = 2
DEFAULT_PIVOTS = (4, 4)  # [S] (pivot_image_token, pivot_text_token) for LLaVA-1.5


def key_l1(keys: Tensor) -> Tensor:
    """[B, H, S, hd] keys -> [B, S] L1 norm of each token's key over all heads and dims (rule 2)."""
    return keys.float().abs().sum(dim=(1, 3))


def pivot_quotas(n_image: int, budget: int, pivot_image: int, pivot_text: int, count: str = "code") -> list[int]:
    """Candidates each pivot takes, in pivot order (image pivots first), capped by what is left."""
    if count not in COUNTS:
        raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
    p_img = min(pivot_image, n_image, budget)
    p = p_img + pivot_text
    left = n_image - p_img
    if p == 0:
        return []
    if count == "code":
        quotas = [budget // p] * p
    else:
        base, rem = divmod(max(budget - p_img, 0), p)
        quotas = [base + (j < rem) for j in range(p)]
    out = []
    for q in quotas:
        q = min(q, left)
        out.append(q)
        left -= q
    return out


def dart_kept_count(n_image: int, budget: int, pivot_image: int = 4, pivot_text: int = 4,
                    count: str = "code") -> int:
    """Image tokens DART keeps out of ``n_image`` for ``budget`` (``n_image`` when it does not prune)."""
    if budget >= n_image:
        return n_image
    return min(pivot_image, n_image, budget) + sum(pivot_quotas(n_image, budget, pivot_image, pivot_text, count))


def dart_select(
    key_norms: Tensor,
    states: Tensor,
    start: Tensor,
    length: Tensor,
    budget: int,
    *,
    pivot_image: int = DEFAULT_PIVOTS[0],
    pivot_text: int = DEFAULT_PIVOTS[1],
    count: str = "code",
) -> Tensor:
    """Kept image-token offsets [B, k] (ascending, unique) per row.

    ``key_norms`` [B, S]: layer K-1's key L1 norms (``key_l1``); ``states`` [B, S, d]: the hidden states
    entering layer K after the final RMSNorm; ``start``/``length`` [B]: each row's image block (equal lengths;
    left padding keeps the text after the image real). Every row keeps the same number of tokens.
    """
    b, s, _ = states.shape
    lengths = {int(x) for x in length.tolist()}
    if len(lengths) != 1:
        raise ValueError("DART rows need the same image token count")
    n = lengths.pop()
    dev = states.device
    if budget >= n:
        return torch.arange(n, device=dev).expand(b, n).clone()
    if pivot_image < 0 or pivot_text < 0 or budget < 1:
        raise ValueError("pivot counts must be >= 0 and the budget >= 1")
    start = start.to(dev)
    d = states.shape[-1]
    img_pos = start[:, None] + torch.arange(n, device=dev)[None]  # [B, N]
    # rules 2-3 ([L] L199-L215): top key-L1 image tokens, and top key-L1 tokens of the text after the image
    p_img = min(pivot_image, n, budget)
    piv_img = key_norms.gather(1, img_pos).topk(p_img, dim=1).indices.sort(dim=1).values  # offsets [B, p_img]
    after = torch.arange(s, device=dev)[None] >= (start + n)[:, None]
    p_txt = min(pivot_text, int(after.sum(1).min()))
    txt = key_norms.masked_fill(~after, float("-inf")).topk(p_txt, dim=1).indices.sort(dim=1).values
    pivot_pos = torch.cat([piv_img + start[:, None], txt], dim=1)  # [B, P] sequence positions, ascending
    quotas = pivot_quotas(n, budget, pivot_image, p_txt, count)  # [L] L189-L193 (count="code")

    # rule 4 ([L] L112, L224-L228): cosine similarity of the final-RMSNorm'ed states
    img = F.normalize(states.gather(1, img_pos[..., None].expand(-1, -1, d)).float(), dim=-1)
    piv = F.normalize(states.gather(1, pivot_pos[..., None].expand(-1, -1, d)).float(), dim=-1)
    cos = torch.einsum("bpd,bnd->bpn", piv, img)  # [B, P, N]
    kept = torch.zeros(b, n, dtype=torch.bool, device=dev)
    kept.scatter_(1, piv_img, True)  # rule 6: image pivots stay ([L] L215, L237)
    avail = ~kept  # candidates: the non-pivot image tokens ([L] L217-L219)
    for j, q in enumerate(quotas):  # rule 5 ([L] L222-L235): least similar remaining, pivot by pivot
        if q <= 0:
            continue
        take = (-cos[:, j]).masked_fill(~avail, float("-inf")).topk(q, dim=1).indices
        kept.scatter_(1, take, True)
        avail.scatter_(1, take, False)
    k = int(kept[0].sum())
    return kept.nonzero()[:, 1].view(b, k)
