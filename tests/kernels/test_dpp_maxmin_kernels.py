"""Greedy-step kernels (DPP / max-min) against their PyTorch references (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.dpp_greedy import (
    dpp_greedy_init,
    dpp_greedy_map,
    dpp_greedy_step,
    dpp_greedy_step_reference,
    dpp_greedy_step_triton,
)
from kernels.maxmin_greedy import (
    maxmin_greedy,
    maxmin_greedy_init,
    maxmin_greedy_step_reference,
    maxmin_greedy_step_triton,
)


def _dpp_kernel(batch: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(batch, n, d, generator=gen), dim=-1)
    r = torch.rand(batch, n, generator=gen) + 0.05
    return r.unsqueeze(2) * torch.bmm(x, x.transpose(1, 2)) * r.unsqueeze(1)


def _distance(batch: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(batch, n, d, generator=gen), dim=-1)
    return 1.0 - torch.bmm(x, x.transpose(1, 2))


@pytest.mark.parametrize(
    ("batch", "n", "d", "k", "block"),
    [(1, 7, 8, 5, None), (3, 37, 40, 12, None), (2, 61, 64, 9, 16), (4, 130, 130, 6, None)],
)
def test_dpp_step_matches_reference_step_by_step(batch, n, d, k, block):
    gen = torch.Generator().manual_seed(n * 7 + batch)
    kernel = _dpp_kernel(batch, n, d, gen)
    cis_r, d2_r, sel_r = dpp_greedy_init(kernel, k)
    cis_k, d2_k, sel_k = dpp_greedy_init(kernel, k)
    for step in range(k):
        dpp_greedy_step_reference(kernel, cis_r, d2_r, step, sel_r)
        dpp_greedy_step_triton(kernel, cis_k, d2_k, step, sel_k, block=block)
        assert torch.equal(sel_k[:, : step + 1], sel_r[:, : step + 1])
        torch.testing.assert_close(cis_k, cis_r, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.isinf(d2_k), torch.isinf(d2_r))
        finite = torch.isfinite(d2_r)
        torch.testing.assert_close(d2_k[finite], d2_r[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(dpp_greedy_map(kernel, k, use_kernel=True), sel_r)


def test_dpp_step_ties_and_rank_exhaustion():
    # identity kernel: every gain ties at 1 -> lower index first, across tiles of 4
    eye = torch.eye(10).expand(2, 10, 10).contiguous()
    assert dpp_greedy_map(eye, 10, use_kernel=True).tolist() == [list(range(10))] * 2
    cis, d2, sel = dpp_greedy_init(eye, 6)
    for step in range(6):
        dpp_greedy_step_triton(eye, cis, d2, step, sel, block=4)
    assert sel.tolist() == [list(range(6))] * 2
    # a rank-2 kernel asked for 5 picks: gains hit 0, guarded (no NaN), picks stay unique
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]) / 1.0
    low = (x @ x.T).unsqueeze(0)
    for use_kernel in (True, False):
        picks = dpp_greedy_map(low, 5, use_kernel=use_kernel)
        assert sorted(picks[0].tolist()) == list(range(5))
    assert torch.equal(dpp_greedy_map(low, 5, use_kernel=True), dpp_greedy_map(low, 5, use_kernel=False))


def test_dpp_step_strided_kernel_and_dispatch():
    gen = torch.Generator().manual_seed(3)
    kernel = _dpp_kernel(3, 29, 32, gen).transpose(1, 2)  # symmetric values, transposed strides
    assert not kernel.is_contiguous()
    want = dpp_greedy_map(kernel.contiguous(), 8, use_kernel=False)
    assert torch.equal(dpp_greedy_map(kernel, 8, use_kernel=True), want)
    # CPU tensors without use_kernel go to the reference
    cis, d2, sel = dpp_greedy_init(kernel, 1)
    dpp_greedy_step(kernel, cis, d2, 0, sel)
    assert sel[:, 0].tolist() == want[:, 0].tolist()


@pytest.mark.parametrize(
    ("batch", "n", "d", "k", "block"),
    [(1, 5, 4, 4, None), (3, 37, 16, 12, None), (2, 61, 8, 20, 16), (4, 130, 32, 7, None)],
)
def test_maxmin_step_matches_reference_step_by_step(batch, n, d, k, block):
    gen = torch.Generator().manual_seed(n * 11 + batch)
    dist = _distance(batch, n, d, gen)
    mind_r, sel_r = maxmin_greedy_init(dist, k)
    mind_k, sel_k = maxmin_greedy_init(dist, k)
    for step in range(1, k):
        maxmin_greedy_step_reference(dist, mind_r, step, sel_r)
        maxmin_greedy_step_triton(dist, mind_k, step, sel_k, block=block)
        assert torch.equal(sel_k, sel_r)
        assert torch.equal(mind_k, mind_r)  # min / where only: bit-exact
    assert torch.equal(maxmin_greedy(dist, k, use_kernel=True), sel_r)
    for row in sel_r.tolist():
        assert len(set(row)) == k


def test_maxmin_step_ties_lower_index_across_tiles():
    # integer distances: many ties; the kernel with tiles of 4 must agree with torch.argmax's first maximum
    gen = torch.Generator().manual_seed(5)
    n = 23
    a = torch.randint(1, 4, (3, n, n), generator=gen).float()
    dist = torch.triu(a, 1) + torch.triu(a, 1).transpose(1, 2)
    mind_r, sel_r = maxmin_greedy_init(dist, 10)
    mind_k, sel_k = maxmin_greedy_init(dist, 10)
    for step in range(1, 10):
        maxmin_greedy_step_reference(dist, mind_r, step, sel_r)
        maxmin_greedy_step_triton(dist, mind_k, step, sel_k, block=4)
    assert torch.equal(sel_k, sel_r)
    # bf16 distances are upcast when loaded
    dist16 = dist.to(torch.bfloat16)
    assert torch.equal(
        maxmin_greedy(dist16, 10, use_kernel=True), maxmin_greedy(dist16, 10, use_kernel=False)
    )
