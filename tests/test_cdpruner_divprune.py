"""CDPruner (conditional DPP) and DivPrune (max-min diversity) on inputs whose right answer is known."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from actors.cdpruner import cdpruner_flops, cdpruner_kernel, cdpruner_relevance, cdpruner_select
from actors.divprune import divprune_flops, divprune_select
from kernels.dpp_greedy import dpp_greedy_map
from tests.flopcount import FlopCounterMode


def _check_valid(idx: torch.Tensor, batch: int, n: int, keep: int) -> None:
    assert idx.dtype == torch.int64 and idx.shape == (batch, min(max(keep, 0), n))
    for row in idx.tolist():
        assert row == sorted(set(row)) and all(0 <= i < n for i in row)


def _divprune_as_published(x: torch.Tensor, keep: int) -> list[int]:
    """vbdi/divprune llava_arch.py:147-171 restated for one item (full min over picked rows each step)."""
    xn = x.float() / x.float().norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.T
    picks: list[int] = []
    for i in range(keep):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


def _slow_greedy_logdet(kernel: torch.Tensor, keep: int) -> list[int]:
    """Independent greedy: add the token maximising log det L_S (float64 slogdet), ties -> lower index."""
    kernel = kernel.double()
    picks: list[int] = []
    for _ in range(keep):
        best, best_i = -math.inf, -1
        for i in range(kernel.shape[0]):
            if i in picks:
                continue
            sub = kernel[picks + [i]][:, picks + [i]]
            sign, logdet = torch.linalg.slogdet(sub)
            value = logdet.item() if sign > 0 else -math.inf
            if value > best:
                best, best_i = value, i
        picks.append(best_i)
    return picks


# ---------------------------------------------------------------------------------------------
# DivPrune
# ---------------------------------------------------------------------------------------------


def test_divprune_never_keeps_both_duplicates():
    # 4 orthogonal directions, each present twice (once rescaled: cosine-identical); keep 4
    base = torch.eye(8)[:4] * torch.tensor([1.0, 2.0, 3.0, 4.0]).unsqueeze(1)
    x = torch.cat([base, 2.5 * base], 0).unsqueeze(0)  # tokens i and i + 4 are duplicates
    kept = divprune_select(x, 4)[0].tolist()
    assert sorted(i % 4 for i in kept) == [0, 1, 2, 3]
    # near-duplicates too, in a random batch
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(5, 10, 32, generator=gen)
    y = torch.cat([y, y + 1e-3 * torch.randn(5, 10, 32, generator=gen)], 1)  # [5, 20, 32]
    for row in divprune_select(y, 10).tolist():
        assert sorted(i % 10 for i in row) == list(range(10))


def test_divprune_first_pick_is_most_isolated_then_farthest():
    angles = torch.tensor([0.0, 10.0, 20.0, 180.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    # token 3's nearest neighbour is ~160 degrees away: first pick; the farthest from it is token 0
    assert divprune_select(x, 1).tolist() == [[3]]
    assert divprune_select(x, 2).tolist() == [[0, 3]]


@pytest.mark.parametrize("seed", range(4))
def test_divprune_matches_published_algorithm(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 16, generator=gen)
    got = divprune_select(x, 11)
    assert [got[b].tolist() for b in range(3)] == [_divprune_as_published(x[b], 11) for b in range(3)]


# ---------------------------------------------------------------------------------------------
# CDPruner
# ---------------------------------------------------------------------------------------------


def _relevance_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 mutually orthogonal tokens (S = I: all equally diverse) and their CLIP cosines to the text."""
    features = torch.eye(5).unsqueeze(0)
    text = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    patches = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # token 0: cos 1 (the most relevant)
            [0.0, 1.0, 0.0, 0.0],  # token 1: cos 0 (irrelevant)
            [1.0, 1.0, 0.0, 0.0],  # cos .707
            [1.0, 2.0, 0.0, 0.0],  # cos .447
            [2.0, 1.0, 0.0, 0.0],  # cos .894
        ]
    ).unsqueeze(0)
    return features, text, patches


def test_cdpruner_relevance_sign_code_prefers_irrelevant_paper_prefers_relevant():
    features, text, patches = _relevance_case()
    cos = F.cosine_similarity(patches[0], text, dim=-1)
    r_code = cdpruner_relevance(text, patches)  # default: the code's negation (llava_arch.py:159)
    neg = -cos
    torch.testing.assert_close(r_code[0], (neg - neg.min() + 1e-6) / (neg.max() - neg.min()))
    assert int(r_code.argmax()) == 1 and int(r_code.argmin()) == 0
    r_paper = cdpruner_relevance(text, patches, sign="paper")
    assert int(r_paper.argmax()) == 0 and int(r_paper.argmin()) == 1
    # S = I, so the greedy DPP takes tokens in decreasing r; keeping 4 of 5 drops the lowest r:
    # with the code's sign the MOST relevant token 0 is dropped (the code's actual behaviour) ...
    assert cdpruner_select(features, r_code, 4).tolist() == [[1, 2, 3, 4]]
    assert cdpruner_select(features, r_code, 1).tolist() == [[1]]
    # ... with the paper's sign the irrelevant token 1 loses to the equally diverse relevant ones
    assert cdpruner_select(features, r_paper, 4).tolist() == [[0, 2, 3, 4]]
    assert cdpruner_select(features, r_paper, 1).tolist() == [[0]]
    # multi-segment text [B, M, D'] is averaged after the negation (llava_arch.py:159)
    two = torch.stack([text, text], 1)
    torch.testing.assert_close(cdpruner_relevance(two, patches), r_code)


def test_cdpruner_relevance_min_max_scope_and_theta():
    gen = torch.Generator().manual_seed(1)
    text, patches = torch.randn(3, 8, generator=gen), torch.randn(3, 20, 8, generator=gen)
    rows = cdpruner_relevance(text, patches)
    assert torch.allclose(rows.amax(-1), torch.ones(3), atol=1e-5) and (rows.amin(-1) > 0).all()
    whole = cdpruner_relevance(text, patches, normalize="batch")  # the literal llava_arch.py:160
    neg = -F.cosine_similarity(patches, text.unsqueeze(1), dim=-1)
    torch.testing.assert_close(whole, (neg - neg.min() + 1e-6) / (neg.max() - neg.min()))
    for b in range(3):  # row mode is independent of the other rows
        torch.testing.assert_close(cdpruner_relevance(text[b : b + 1], patches[b : b + 1])[0], rows[b])
    feats = torch.randn(3, 20, 16, generator=gen)
    s = F.normalize(feats, dim=-1) @ F.normalize(feats, dim=-1).transpose(1, 2)
    torch.testing.assert_close(cdpruner_kernel(feats, rows), rows[:, :, None] * s * rows[:, None, :])
    w = torch.exp(0.5 / (2 * 0.5) * rows)  # llava_arch.py:164-166 with theta = 0.5
    torch.testing.assert_close(cdpruner_kernel(feats, rows, theta=0.5), w[:, :, None] * s * w[:, None, :])
    torch.testing.assert_close(cdpruner_kernel(feats, None), s)


def test_cdpruner_greedy_equals_brute_force_map_on_clusters():
    # 3 orthogonal clusters of 2 near-duplicate tokens with distinct relevance: the MAP subset of
    # size 3 is the most relevant token of each cluster, and greedy finds it
    e = torch.eye(6)
    feats = torch.stack(
        [
            e[0] + 0.05 * e[3],
            e[0] - 0.05 * e[3],
            e[1] + 0.05 * e[4],
            e[1] - 0.05 * e[4],
            e[2] + 0.05 * e[5],
            e[2] - 0.05 * e[5],
        ]
    )
    rel = torch.tensor([[0.3, 0.9, 0.8, 0.2, 0.5, 0.6]])
    kernel = cdpruner_kernel(feats.unsqueeze(0), rel)[0].double()
    best = max(
        itertools.combinations(range(6), 3),
        key=lambda s: torch.linalg.slogdet(kernel[list(s)][:, list(s)])[1].item(),
    )
    assert list(best) == [1, 2, 5]
    assert cdpruner_select(feats.unsqueeze(0), rel, 3).tolist() == [[1, 2, 5]]


@pytest.mark.parametrize("seed", range(5))
def test_cdpruner_greedy_equals_slow_logdet_greedy(seed):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 14, 8, generator=gen)
    rel = torch.rand(2, 14, generator=gen) + 0.1
    kernel = cdpruner_kernel(feats, rel)
    picks = dpp_greedy_map(kernel, 6)  # selection order
    for b in range(2):
        assert picks[b].tolist() == _slow_greedy_logdet(kernel[b], 6)
    assert torch.equal(cdpruner_select(feats, rel, 6), picks.sort(-1).values)


# ---------------------------------------------------------------------------------------------
# shared contract
# ---------------------------------------------------------------------------------------------


def test_batched_rows_equal_one_by_one():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(16, 50, 32, generator=gen)
    text, patches = torch.randn(16, 12, generator=gen), torch.randn(16, 50, 12, generator=gen)
    rel = cdpruner_relevance(text, patches)
    cd = cdpruner_select(feats, rel, 13)
    dv = divprune_select(feats, 13)
    for b in range(16):
        rel_b = cdpruner_relevance(text[b : b + 1], patches[b : b + 1])
        assert torch.equal(cdpruner_select(feats[b : b + 1], rel_b, 13)[0], cd[b])
        assert torch.equal(divprune_select(feats[b : b + 1], 13)[0], dv[b])


@pytest.mark.parametrize("keep", [-1, 0, 1, 9, 23, 24, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_sorted_unique_in_range_all_dtypes(keep, dtype):
    gen = torch.Generator().manual_seed(keep + 10)
    batch, n = 3, 24
    feats = torch.randn(batch, n, 16, generator=gen).to(dtype)
    rel = cdpruner_relevance(
        torch.randn(batch, 8, generator=gen).to(dtype), torch.randn(batch, n, 8, generator=gen).to(dtype)
    )
    assert rel.dtype == torch.float32
    for idx in (
        cdpruner_select(feats, rel, keep),
        cdpruner_select(feats, None, keep),
        divprune_select(feats, keep),
    ):
        _check_valid(idx, batch, n, keep)
        if keep >= n:
            assert idx.tolist() == [list(range(n))] * batch
    if dtype == torch.bfloat16:  # DivPrune upcasts first: same picks as the rounded values in fp32
        assert torch.equal(divprune_select(feats, keep), divprune_select(feats.float(), keep))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "keep"), [(40, 16, 10), (64, 24, 1), (33, 8, 32)])
def test_cdpruner_flops_matmul_parts_match_flop_counter(n, d, keep):
    gen = torch.Generator().manual_seed(n)
    feats = torch.randn(1, n, d, generator=gen)
    text, patches = torch.randn(1, 2, 12, generator=gen), torch.randn(1, n, 12, generator=gen)
    with FlopCounterMode(display=False) as counter:
        rel = cdpruner_relevance(text, patches)
    parts = cdpruner_flops(n, d, keep, text_dim=12, text_segments=2, breakdown=True)
    assert counter.get_total_flops() == parts["relevance"]
    with FlopCounterMode(display=False) as counter:
        cdpruner_select(feats, rel, keep, use_kernel=False)
    assert counter.get_total_flops() == parts["similarity"] + parts["greedy_matmul"]
    assert parts["similarity"] == 2 * n * n * d and parts["greedy_matmul"] == n * keep * (keep - 1)
    assert cdpruner_flops(n, d, keep) == sum(parts.values()) - parts["relevance"]
    assert cdpruner_flops(n, d, n) == 0.0


@pytest.mark.parametrize(("n", "d", "keep"), [(40, 16, 10), (64, 24, 1)])
def test_divprune_flops_matmul_part_matches_flop_counter(n, d, keep):
    feats = torch.randn(1, n, d, generator=torch.Generator().manual_seed(n))
    with FlopCounterMode(display=False) as counter:
        divprune_select(feats, keep, use_kernel=False)
    parts = divprune_flops(n, d, keep, breakdown=True)
    assert counter.get_total_flops() == parts["similarity"] == 2 * n * n * d
    assert divprune_flops(n, d, keep) == 2 * n * n * d + 2 * n * n + 2 * n * (keep - 1)
    assert divprune_flops(n, d, n) == 0.0
