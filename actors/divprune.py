"""DivPrune: text-agnostic visual-token pruning by greedy max-min diversity (Alvar et al., CVPR 2025).

Behaviour follows the public code (github vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``):

- Features: the **projected** visual tokens, i.e. the LLM input embeddings of the image span
  (line 374: ``new_input_embeds[0][SYS_TOKEN_LEN:SYS_TOKEN_LEN+img_feature_len]``).
- Distance: ``1 - cosine similarity`` (line 155), cosine from row-normalised features (lines 147-150).
  The code computes it in the model's dtype (fp16); here it is float32 so that results do not depend
  on the input dtype's rounding more than the inputs themselves do.
- First pick: the token whose nearest neighbour is farthest — the second-smallest entry of each
  column of the distance matrix (the smallest being its ~0 self-distance), argmax (lines 164-165, 169).
- Later picks: argmax over tokens of the min distance to the picked set (lines 162, 167, 169); ties ->
  lower index (``torch.argmax``). Incremental running min here (``kernels/maxmin_greedy.py``): the same
  picks in O(N) per step instead of the code's O(iN).
- Picked tokens are excluded from later picks (the code relies on their ~0 self-distance; they differ
  only when all remaining tokens duplicate picked ones, where the code can repeat an index).
- Output sorted ascending (line 379). The code handles batch item 0 only (line 374); rows are
  independent here.
- ``keep``: the code takes ``int(round(ratio * N))`` (line 153); here the count is given directly.
  ``keep >= N`` keeps every token, ``keep <= 0`` none.
"""

from __future__ import annotations

import torch

from actors.pruners import trivial_selection
from kernels.maxmin_greedy import maxmin_greedy
from pipeline.flops_pruners import divprune_selection_flops as divprune_flops  # noqa: F401 - the one FLOPs model


def divprune_distance(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` [B, N, N] float32 of the rows of ``features`` [B, N, D] (llava_arch.py:147-150, 155)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}")
    x = features.float()
    # no epsilon in the code's norm (line 148); the clamp only matters for an all-zero token
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return 1.0 - torch.bmm(x, x.transpose(1, 2))


def divprune_select(features: torch.Tensor, keep: int, *, use_kernel: bool | None = None) -> torch.Tensor:
    """Indices [B, keep'] (int64, ascending, keep' = clamp(keep, 0, N)) of the tokens DivPrune keeps."""
    keep, trivial = trivial_selection(features, keep)
    if trivial is not None:
        return trivial
    picks = maxmin_greedy(divprune_distance(features), keep, use_kernel=use_kernel)
    return torch.sort(picks, dim=-1).values  # llava_arch.py:379
