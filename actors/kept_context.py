"""The caption model's kept-patch context (``CaptionConfig.kept_context``, the project's option).

ACCM's caption model reads only the patches the base pruner discarded (ASGO-MM/ACCM
``llava/model/multimodal_encoder/clip_encoder.py`` lines 268-275). A fact that needs the whole scene, such as
how many red objects there are, is then unsayable whenever one counted object was kept: the caption model
cannot see it, and the LVLM cannot count from its few kept tokens (``jobs/diagnose_count.py``). With
``kept_context`` the mapper reads every patch: the discarded ones first (their slots keep their indices), then
the kept ones, each row with one extra channel that is 0 for a discarded patch and 1 for a kept one. Through
the mapper's Linear that channel is a learned embedding added to the kept slots, so the model can tell what
the LVLM already sees. The FLOPs count the longer mapper input (``discarded_tokens`` = every patch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from actors.pruners import gather_rows


def with_kept_context(discarded: Tensor, kept: Tensor) -> Tensor:
    """[B, M, D] discarded + [B, K, D] kept -> [B, M + K, D + 1]: the flag channel 0 / 1, discarded first."""
    if discarded.shape[0] != kept.shape[0] or discarded.shape[-1] != kept.shape[-1]:
        raise ValueError(f"discarded {tuple(discarded.shape)} and kept {tuple(kept.shape)} do not pair up")
    flag = lambda x, v: torch.cat([x, x.new_full((*x.shape[:-1], 1), v)], dim=-1)  # noqa: E731
    return torch.cat([flag(discarded, 0.0), flag(kept, 1.0)], dim=1)


def flag_all_discarded(features: Tensor) -> Tensor:
    """[B, N, D] -> [B, N, D + 1] with the flag 0: every patch offered as discarded (pre-training's warm-up)."""
    return torch.cat([features, features.new_zeros(*features.shape[:-1], 1)], dim=-1)


def kept_indices(discarded_indices: list[int], n_patches: int) -> list[int]:
    """The patches not among ``discarded_indices``, ascending: the kept slots' patches."""
    dropped = set(discarded_indices)
    return [p for p in range(n_patches) if p not in dropped]


def kept_order(discarded_indices: list[int], n_patches: int) -> list[int]:
    """The patch of each mapper slot under ``kept_context``: the discarded ones in their order, then the rest
    ascending."""
    return list(discarded_indices) + kept_indices(discarded_indices, n_patches)


def append_kept(discarded: Tensor, full: Tensor, discarded_indices: list[list[int]]) -> Tensor:
    """The mapper input under ``kept_context``: ``discarded`` [B, M, D] (rows of ``full`` [B, N, D] at
    ``discarded_indices``), then the rest of ``full``'s rows ascending, flagged (``with_kept_context``)."""
    kept = torch.tensor([kept_indices(d, full.shape[1]) for d in discarded_indices], device=full.device)
    return with_kept_context(discarded, gather_rows(full, kept))


@torch.no_grad()
def enable_kept_context(model) -> None:
    """Turn a trained caption model (``actors.captioner.CaptionModel``) into one that reads kept patches too, in
    place: its mapper Linear gets the flag's input column, zero at first, so the model starts out treating
    kept patches as discarded ones and learns the difference in fine-tuning."""
    if model.config.kept_context:
        return
    old = model.mapper.linear
    new = torch.nn.Linear(old.in_features + 1, old.out_features).to(old.weight)
    new.weight.zero_()
    new.weight[:, : old.in_features] = old.weight
    new.bias.copy_(old.bias)
    model.mapper.linear = new
    model.config.kept_context = True
