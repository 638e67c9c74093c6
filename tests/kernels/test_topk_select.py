"""Top-k selection kernel against its reference and a brute-force statement of the tie rule."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.topk_select import select_topk, split_topk


def _brute_force(scores: torch.Tensor, k, lengths) -> tuple[list[list[int]], list[list[int]]]:
    """The documented rule, spelled out in Python: higher score first, ties -> lower index, NaN = -inf."""
    kept, discarded = [], []
    for b, row in enumerate(scores.float().tolist()):
        n = int(lengths[b])
        kb = min(int(k[b]) if isinstance(k, torch.Tensor) and k.dim() else int(k), n)
        order = sorted(range(n), key=lambda i: (-(-math.inf if math.isnan(row[i]) else row[i]), i))
        kept.append(sorted(order[:kb]))
        discarded.append(sorted(order[kb:]))
    return kept, discarded


def _unpad(t: torch.Tensor) -> list[list[int]]:
    return [[i for i in row if i >= 0] for row in t.tolist()]


def _check_padding(t: torch.Tensor) -> None:
    # ascending valid entries first, then only -1
    for row in t.tolist():
        valid = [i for i in row if i >= 0]
        assert row == valid + [-1] * (len(row) - len(valid))
        assert valid == sorted(valid) and len(set(valid)) == len(valid)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_topk_random_shapes_match_reference_and_rule(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 9, (), generator=gen))
    n_max = int(torch.randint(1, 140, (), generator=gen)) | 1  # odd: never a power of two (bar 1)
    # few distinct values -> many ties; some NaN and -inf
    scores = torch.randint(0, 6, (batch, n_max), generator=gen).float() / 3
    scores[torch.rand(batch, n_max, generator=gen) < 0.05] = float("nan")
    scores[torch.rand(batch, n_max, generator=gen) < 0.05] = float("-inf")
    scores = scores.to(dtype)
    lengths = torch.randint(0, n_max + 1, (batch,), generator=gen)
    lengths[0] = n_max
    k = torch.randint(0, n_max + 3, (batch,), generator=gen)  # some k > len: clamped
    k[0] = 0
    if batch > 1:
        k[1] = lengths[1]  # k == len

    kept, disc = split_topk(scores, k, lengths, use_kernel=True)
    ref_kept, ref_disc = split_topk(scores, k, lengths, use_kernel=False)
    assert torch.equal(kept, ref_kept) and torch.equal(disc, ref_disc)
    want_kept, want_disc = _brute_force(scores, k, lengths)
    assert _unpad(kept) == want_kept and _unpad(disc) == want_disc
    kk = torch.minimum(k, lengths)
    assert kept.shape == (batch, int(kk.max())) and disc.shape == (batch, int((lengths - kk).max()))
    assert kept.dtype == torch.int64
    _check_padding(kept)
    _check_padding(disc)


def test_select_topk_ties_lower_index_wins():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.5]])
    for use_kernel in (True, False):
        assert select_topk(scores, 3, use_kernel=use_kernel).tolist() == [[1, 2, 4]]
    constant = torch.zeros(2, 37)
    for use_kernel in (True, False):
        kept, disc = split_topk(constant, 5, use_kernel=use_kernel)
        assert kept.tolist() == [list(range(5))] * 2
        assert disc.tolist() == [list(range(5, 37))] * 2


def test_select_topk_k_zero_and_k_len_scalar():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(4, 45, generator=gen)
    for use_kernel in (True, False):
        none, all_disc = split_topk(scores, 0, use_kernel=use_kernel)
        assert none.shape == (4, 0) and all_disc.tolist() == [list(range(45))] * 4
        every, no_disc = split_topk(scores, 45, use_kernel=use_kernel)
        assert every.tolist() == [list(range(45))] * 4 and no_disc.shape == (4, 0)
    top = select_topk(scores, 9, use_kernel=True)
    expect = scores.topk(9, dim=1).indices.sort(dim=1).values  # no ties in continuous scores
    assert torch.equal(top, expect)


def test_select_topk_larger_row_uses_several_blocks():
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(2, 300, generator=gen).to(torch.bfloat16)  # bf16: plenty of exact ties
    lengths = torch.tensor([300, 211])
    got = select_topk(scores, torch.tensor([64, 100]), lengths, use_kernel=True)
    ref = select_topk(scores, torch.tensor([64, 100]), lengths, use_kernel=False)
    assert torch.equal(got, ref)
    assert _unpad(got) == _brute_force(scores, torch.tensor([64, 100]), lengths)[0]


def test_select_topk_rejects_bad_arguments():
    scores = torch.randn(2, 10)
    with pytest.raises(ValueError):
        select_topk(scores, -1, use_kernel=False)
    with pytest.raises(ValueError):
        select_topk(scores, 3, torch.tensor([4, 11]), use_kernel=True)
    with pytest.raises(ValueError):
        select_topk(scores, torch.tensor([1, 2, 3]), use_kernel=False)
