"""Compaction kernel (hidden states and K/V caches) against its reference."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kernels.compact import compact_cache_, compact_kv, compact_rows, keep_positions


def _keep_idx(batch: int, length: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Per-row ascending kept positions with a different count per row, -1 padded."""
    rows = []
    for b in range(batch):
        n = width if b == 0 else int(torch.randint(0, width + 1, (), generator=gen))
        pos = torch.randperm(length, generator=gen)[:n].sort().values
        rows.append(torch.cat([pos, torch.full((width - n,), -1, dtype=torch.int64)]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("shape", "width", "dtype"),
    [
        ((1, 7, 5), 3, torch.float32),  # hidden states [B, L, D]
        ((5, 37, 96), 19, torch.bfloat16),
        ((3, 4, 29, 16), 11, torch.float32),  # K/V [B, H, L, Dh]
        ((8, 2, 23, 24), 23, torch.bfloat16),
        ((2, 3, 41, 600), 5, torch.float16),  # D > BLOCK_D: several feature blocks
    ],
)
def test_compact_rows_matches_reference(shape, width, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    idx = _keep_idx(shape[0], shape[-2], width, gen)
    got = compact_rows(x, idx, use_kernel=True)
    ref = compact_rows(x, idx, use_kernel=False)
    assert got.dtype == dtype and got.shape == (*shape[:-2], width, shape[-1]) and got.is_contiguous()
    assert torch.equal(got, ref)  # a gather: bit-exact
    b = 0  # row 0 keeps `width` real positions
    assert torch.equal(ref[b, ..., :, :], x[b, ..., idx[b], :])
    pad = idx < 0
    if pad.any():
        assert (got.movedim(-2, 1)[pad] == 0).all()


def test_compact_rows_strided_input_and_int32_index():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 30, 6, 20, generator=gen)
    x = base.transpose(1, 2)[..., ::2]  # [2, 6, 30, 10], non-contiguous in every dim
    idx = torch.tensor([[0, 4, 29, -1], [1, 2, 3, 5]], dtype=torch.int32)
    assert torch.equal(compact_rows(x, idx, use_kernel=True), compact_rows(x, idx, use_kernel=False))


def test_compact_rows_rejects_out_of_range_index():
    with pytest.raises(IndexError):
        compact_rows(torch.zeros(1, 4, 2), torch.tensor([[0, 4]]), use_kernel=True)


def test_compact_kv_and_dynamic_cache():
    gen = torch.Generator().manual_seed(9)
    layers = [(torch.randn(2, 2, 13, 8, generator=gen), torch.randn(2, 2, 13, 8, generator=gen)) for _ in range(3)]
    idx = torch.tensor([[0, 3, 5, 12], [1, 2, 7, -1]])
    got = compact_kv(layers, idx, use_kernel=True)
    ref = compact_kv(layers, idx, use_kernel=False)
    assert len(got) == 3 and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, ref, strict=True))

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k.clone(), v.clone(), i)
    assert compact_cache_(cache, idx, use_kernel=True) is cache
    assert cache.get_seq_length() == 4
    for layer, (k, v) in zip(cache.layers, ref, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_fastv_pipeline_identical_through_kernel_and_reference():
    """Score the image span, keep the top-k, compact hidden states and KV: both paths agree exactly."""
    from kernels.token_scores import head_mean_query_scores
    from kernels.topk_select import select_topk

    gen = torch.Generator().manual_seed(13)
    batch, heads, seq, dim = 3, 4, 40, 32
    start, span = torch.tensor([2, 3, 2]), torch.tensor([30, 25, 33])
    attn = torch.rand(batch, heads, seq, seq, generator=gen).softmax(-1)
    hidden = torch.randn(batch, seq, dim, generator=gen)
    kv = [(torch.randn(batch, 2, seq, 8, generator=gen), torch.randn(batch, 2, seq, 8, generator=gen))]
    outputs = []
    for use_kernel in (True, False):
        scores = head_mean_query_scores(attn, start, span, use_kernel=use_kernel)
        kept = select_topk(scores, 7, span, use_kernel=use_kernel)
        positions = keep_positions(kept, start, span, seq)
        outputs.append(
            (kept, positions, compact_rows(hidden, positions, use_kernel=use_kernel), compact_kv(kv, positions, use_kernel=use_kernel))
        )
    (k1, p1, h1, kv1), (k2, p2, h2, kv2) = outputs
    assert torch.equal(k1, k2) and torch.equal(p1, p2) and torch.equal(h1, h2)
    assert torch.equal(kv1[0][0], kv2[0][0]) and torch.equal(kv1[0][1], kv2[0][1])
    assert p1.shape == (batch, seq - int(span.min()) + 7)
    assert p1[0].tolist() == [0, 1, *(2 + k1[0]).tolist(), *range(32, 40)] + [-1] * 5  # 17 of 22 used


def test_keep_positions_pads_rows_of_different_length():
    got = keep_positions(torch.tensor([[0, 3, -1], [1, 2, 4]]), torch.tensor([2, 1]), 5, torch.tensor([9, 7]))
    assert got.tolist() == [[0, 1, 2, 5, 7, 8], [0, 2, 3, 5, 6, -1]]
    with pytest.raises(IndexError):
        keep_positions(torch.tensor([[5]]), 0, 5, 6)
