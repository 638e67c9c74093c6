"""Scoring kernels against their PyTorch references (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.token_scores import cls_attention_scores, cosine_scores, head_mean_query_scores

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # scores accumulate in fp32


def _probs(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen).softmax(dim=-1).to(dtype)


@pytest.mark.parametrize(
    ("batch", "heads", "queries", "length", "dtype"),
    [(1, 1, 1, 7, torch.float32), (3, 4, 5, 37, torch.float32), (8, 3, 2, 61, torch.bfloat16), (5, 2, 3, 100, torch.float16)],
)
def test_head_mean_query_scores_matches_reference(batch, heads, queries, length, dtype):
    gen = torch.Generator().manual_seed(batch * 100 + length)
    attn = _probs((batch, heads, queries, length), dtype, gen)
    start = torch.randint(0, length // 2, (batch,), generator=gen)
    span = torch.minimum(torch.randint(0, length, (batch,), generator=gen), length - start)
    span[0] = length - start[0]  # one span running to the end of the row
    if batch > 2:
        span[1] = 0  # an item with no image tokens at all
    got = head_mean_query_scores(attn, start, span, use_kernel=True)
    ref = head_mean_query_scores(attn, start, span, use_kernel=False)
    assert got.dtype == torch.float32 and got.shape == (batch, int(span.max()))
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=TOL[dtype], atol=TOL[dtype])
    # the reference itself: the head-mean of the last query row, shifted by each item's span start
    b = 0
    expect = attn[b, :, -1, start[b] : start[b] + span[b]].float().mean(0)
    torch.testing.assert_close(ref[b, : span[b]], expect)


def test_head_mean_query_scores_row_input_and_query_index():
    gen = torch.Generator().manual_seed(1)
    attn = _probs((2, 3, 6, 29), torch.float32, gen)
    full = head_mean_query_scores(attn, 4, 17, query_index=2, use_kernel=True)
    rows = head_mean_query_scores(attn[:, :, 2, :], 4, 17, use_kernel=True)  # strided [B, H, L] view
    assert full.shape == (2, 17)
    torch.testing.assert_close(full, rows, rtol=0, atol=0)
    torch.testing.assert_close(full, attn[:, :, 2, 4:21].mean(1))


def test_head_mean_query_scores_rejects_out_of_range_span():
    attn = torch.rand(1, 2, 1, 10)
    with pytest.raises(ValueError):
        head_mean_query_scores(attn, 5, 6, use_kernel=True)


@pytest.mark.parametrize(("batch", "heads", "tokens", "dtype"), [(1, 1, 5, torch.float32), (4, 6, 63, torch.bfloat16), (7, 3, 130, torch.float32)])
def test_cls_attention_scores_matches_reference(batch, heads, tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    layer = _probs((batch, heads, tokens + 1, tokens + 1), dtype, gen)
    cls_row = layer[:, :, 0, 1:]  # CLS -> patches, a strided view as the engine passes it
    got = cls_attention_scores(cls_row, use_kernel=True)
    ref = cls_attention_scores(cls_row, use_kernel=False)
    assert got.shape == (batch, tokens) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(ref, cls_row.float().sum(1))


@pytest.mark.parametrize(("batch", "tokens", "dim", "dtype"), [(1, 3, 5, torch.float32), (3, 45, 70, torch.bfloat16), (6, 33, 200, torch.float32)])
def test_cosine_scores_matches_reference(batch, tokens, dim, dtype):
    gen = torch.Generator().manual_seed(dim)
    patches = torch.randn(batch, tokens, dim, generator=gen).to(dtype)
    patches[0, 0] = 0  # a zero patch: eps keeps the score finite (0)
    text = torch.randn(batch, dim, generator=gen).to(dtype)
    got = cosine_scores(patches, text, use_kernel=True)
    ref = cosine_scores(patches, text, use_kernel=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got[0, 0] == 0
    torch.testing.assert_close(ref, F.cosine_similarity(patches.float(), text.float()[:, None, :], dim=-1), rtol=1e-5, atol=1e-6)


def test_cosine_scores_broadcast_text_and_strided_patches():
    gen = torch.Generator().manual_seed(3)
    patches = torch.randn(2, 20, 96, generator=gen)[:, ::2, :48]  # non-contiguous view
    text = torch.randn(48, generator=gen)
    got = cosine_scores(patches, text, use_kernel=True)
    torch.testing.assert_close(got, cosine_scores(patches, text.expand(2, 48).clone(), use_kernel=False))
