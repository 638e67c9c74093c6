"""DART (actors.dart): hand-built selections, a loop reference of the public code's rules, and the engine path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests import test_engine

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors.dart import dart_flops, dart_kept_count, dart_select, key_l1, pivot_quotas  # noqa: E402
from actors.engine import LlavaEngine  # noqa: E402
from actors.fastv import FastVSpec  # noqa: E402
from actors.tiny import build_tiny_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _e(i: int, d: int = 6) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), d).float()


def _hand_built(image_states: list[torch.Tensor], text_pivot_state: torch.Tensor):
    """1 text token before, N image tokens, 2 after. Image pivot = offset 0, text pivot = last token."""
    n = len(image_states)
    s = 1 + n + 2
    states = torch.stack([_e(5), *image_states, _e(5) + 0.3 * _e(4), text_pivot_state])[None]
    norms = torch.ones(1, s)
    norms[0, 1] = 10.0  # image offset 0: the largest key norm among the image tokens
    norms[0, 1 + 1 : 1 + n] = torch.linspace(2.0, 3.0, n - 1)
    norms[0, -1] = 10.0  # the last text token: the text pivot
    norms[0, 0] = 100.0  # text before the image is never a pivot
    return norms, states, torch.tensor([1]), torch.tensor([n])


def test_copy_of_a_pivot_is_dropped_before_a_distinct_token():
    e = _e
    imgs = [e(0), e(1) + 0.1 * e(0), e(2) + 0.2 * e(0), e(0), e(3) - 0.3 * e(0), e(1) + e(2) - 0.05 * e(0)]
    norms, states, start, length = _hand_built(imgs, e(0) + 0.1 * e(1))
    kept = dart_select(norms, states, start, length, budget=5, pivot_image=1, pivot_text=1)
    assert kept.tolist() == [[0, 1, 2, 4, 5]]  # offset 3 (== the pivot) is the one dropped


def test_duplicated_image_tokens_are_not_both_kept():
    e = _e
    imgs = [e(0), e(1), e(0), e(2) + 0.1 * e(1), e(0), e(3) - 0.2 * e(1)]
    norms, states, start, length = _hand_built(imgs, e(0) + 0.2 * e(4))
    kept = dart_select(norms, states, start, length, budget=4, pivot_image=1, pivot_text=1, count="budget")[0].tolist()
    assert sum(i in kept for i in (0, 2, 4)) == 1  # three copies of e0: only one stays
    assert kept == [0, 1, 3, 5]


def _reference(norms, states, start, n, budget, p_img, p_txt, count):
    """One row, the public code's loop ([L] L199-L237) with pivots in ascending position order."""
    s = int(start)
    img = norms[s : s + n]
    image_idx = sorted((img.topk(min(p_img, n, budget)).indices + s).tolist())
    query_idx = sorted((norms[s + n :].topk(p_txt).indices + s + n).tolist())
    quotas = pivot_quotas(n, budget, p_img, p_txt, count)
    keep = set(image_idx)
    valid = sorted(set(range(s, s + n)) - set(image_idx))
    for item, q in zip(image_idx + query_idx, quotas, strict=True):
        if q <= 0:
            continue
        cos = -F.cosine_similarity(states[item], states[valid], dim=-1)
        took = [valid[i] for i in cos.topk(q).indices.tolist()]
        keep.update(took)
        valid = sorted(set(valid) - set(took))
    return sorted(i - s for i in keep)


@pytest.mark.parametrize("count", ["budget", "code"])
@pytest.mark.parametrize("budget", [1, 3, 8, 13, 20, 29])
def test_random_rows_match_the_loop_reference(count: str, budget: int):
    g = torch.Generator().manual_seed(budget)
    b, n, d = 5, 30, 16
    starts = torch.tensor([3, 7, 5, 9, 4])
    seq = 50
    norms = torch.rand(b, seq, generator=g)
    states = torch.randn(b, seq, d, generator=g)
    kept = dart_select(norms, states, starts, torch.full((b,), n), budget, count=count)
    assert kept.shape == (b, dart_kept_count(n, budget, 4, 4, count))
    if count == "budget":
        assert kept.shape[1] == budget
    for r in range(b):
        row = kept[r].tolist()
        assert row == sorted(set(row)) and all(0 <= i < n for i in row)  # sorted, unique, image offsets
        assert row == _reference(norms[r], states[r], starts[r], n, budget, 4, 4, count)
        alone = dart_select(norms[r : r + 1], states[r : r + 1], starts[r : r + 1], torch.tensor([n]), budget,
                            count=count)  # fmt: skip
        assert alone[0].tolist() == row  # independent of batch-mates


def test_kept_counts_and_flops():
    assert dart_kept_count(576, 128, count="budget") == 128
    assert dart_kept_count(576, 128) == 132  # the default is the public code's count
    assert dart_kept_count(576, 128, count="code") == 4 + 8 * 16  # the public code: 132 for "128"
    assert dart_kept_count(576, 64, count="code") == 4 + 64
    assert dart_kept_count(64, 64) == 64 and dart_kept_count(64, 100, count="code") == 64
    assert dart_kept_count(64, 63, count="code") == 4 + 8 * 7
    assert dart_kept_count(66, 64, count="code") == 66  # quotas capped by the candidates left
    assert pivot_quotas(576, 128, 4, 4, count="budget") == [16, 16, 16, 16, 15, 15, 15, 15]
    assert pivot_quotas(576, 128, 4, 4) == [16] * 8  # the code: budget // 8 each
    assert dart_flops(576, 4096, 8) == 576 * 4096 + 2 * 584 * 4096 + 2 * 576 * 4096 + 2 * 8 * 576 * 4096
    assert dart_flops(576, 4096, 8, kv_dim=1024, n_text=10) < dart_flops(576, 4096, 8, n_text=10)
    keys = torch.randn(2, 3, 7, 5)
    torch.testing.assert_close(key_l1(keys), keys.abs().permute(0, 2, 1, 3).reshape(2, 7, -1).sum(-1))


# ---------------------------------------------------------------------------------------------- engine

QUESTIONS = test_engine.QUESTIONS * 2
IDS = [f"item-{i}" for i in range(16)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LlavaEngine:
    path = tmp_path_factory.mktemp("tiny_llava_dart")
    build_tiny_llava(path, text_layers=3, seed=3, init_std=0.2)
    return LlavaEngine.from_pretrained(str(path))


@pytest.fixture(scope="module")
def pixels(engine: LlavaEngine) -> torch.Tensor:
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(16)]
    return engine.preprocess(imgs)


def _kept_offsets(engine: LlavaEngine, res, i: int, question: str) -> list[int]:
    pad = max(res.prefill_tokens) - res.prefill_tokens[i]
    start = len(engine._prompt_ids(question, None)[0])
    pos = engine.last_state.fastv_positions[i] - pad
    return (pos[(pos >= start) & (pos < start + 64)] - start).tolist()


def test_engine_dart_bs1_equals_bs16_and_compacts_kv(engine: LlavaEngine, pixels):
    engine.keep_last_state = True
    try:
        batched, pruned = engine.answer(pixels, QUESTIONS, IDS, method="dart", dart_count="budget", keep_tokens=8, max_new_tokens=6)
        assert pruned.retained.shape[:2] == (16, 64)  # every patch reaches the LLM
        width = max(batched.prefill_tokens)
        grown = max(batched.new_tokens) - 1
        # layers < K=2 keep the full cache; layer 2 holds the text + the 8 kept image tokens
        assert [k.shape[2] for k in engine.last_state.keys] == [width + grown] * 2 + [width - 64 + 8 + grown]
        kept_b = [_kept_offsets(engine, batched, i, QUESTIONS[i]) for i in range(16)]
        assert all(len(k) == 8 and k == sorted(set(k)) for k in kept_b)
        assert len(set(map(tuple, batched.token_ids))) >= 3, "outputs too uniform to tell items apart"
        for i in range(16):
            single, _ = engine.answer(pixels[i : i + 1], QUESTIONS[i : i + 1], IDS[i : i + 1], method="dart",
                                      dart_count="budget",
                                      keep_tokens=8, max_new_tokens=6)  # fmt: skip
            assert single.token_ids[0] == batched.token_ids[i], i
            assert _kept_offsets(engine, single, 0, QUESTIONS[i]) == kept_b[i], i
            assert single.flops[0] == batched.flops[i]
    finally:
        engine.keep_last_state, engine.last_state = False, None
    # the kept tokens differ from FastV's (another rule) on at least one item
    engine.keep_last_state = True
    try:
        fv, _ = engine.answer(pixels[:4], QUESTIONS[:4], IDS[:4], method="fastv", keep_tokens=8, max_new_tokens=1)
        kept_fv = [_kept_offsets(engine, fv, i, QUESTIONS[i]) for i in range(4)]
    finally:
        engine.keep_last_state, engine.last_state = False, None
    assert kept_fv != kept_b[:4]


def test_engine_dart_selection_is_dart_select_on_layer_k_minus_1(engine: LlavaEngine, pixels):
    """The runner's picks == dart_select on layer 1's key cache and the final-normed states entering layer 2."""
    res, pruned = engine.answer(pixels[:3], QUESTIONS[:3], IDS[:3], method="none", max_new_tokens=1)
    runner = engine.runner
    seqs, starts = [], []
    for i in range(3):
        before, after = engine._prompt_ids(QUESTIONS[i], None)
        emb = engine.model.get_input_embeddings()
        vis = engine.project(pruned.retained[i])
        seqs.append(torch.cat([emb(torch.tensor(before)), vis, emb(torch.tensor(after))]))
        starts.append(len(before))
    width = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(3, width, seqs[0].shape[-1])
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        embeds[i, width - len(s) :], mask[i, width - len(s) :] = s, True
    start = torch.tensor([width - len(s) + st for s, st in zip(seqs, starts, strict=True)])
    length = torch.full((3,), 64)
    spec = FastVSpec(layer=2, keep=8, rule="dart")
    _, state = runner.prefill(embeds, mask, start, length, spec)
    _, full = runner.prefill(embeds, mask, start, length, None)
    # hidden entering layer 2 = layers 0-1 of the unpruned run
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    hidden, cos_sin, allowed = embeds, runner.lm.rotary_emb(embeds, pos), runner._allowed(mask, width)
    with torch.no_grad():
        for layer in runner.layers[:2]:
            hidden = runner._layer(layer, hidden, cos_sin, allowed, None, False)[0]
        expect = dart_select(key_l1(full.keys[1]), runner.lm.norm(hidden), start, length, 8)
    got = torch.stack([p[(p >= s) & (p < s + 64)] - s for p, s in zip(state.fastv_positions, start, strict=True)])
    assert torch.equal(got, expect)


def test_engine_dart_keep_all_equals_unpruned(engine: LlavaEngine, pixels):
    # through the compaction path itself (identity gather) at the runner level: logits to float tolerance
    feats = engine.project(engine.encode_images(pixels[:2]).patch_features)
    emb = engine.model.get_input_embeddings()
    before, after = engine._prompt_ids(QUESTIONS[0], None)
    seq = torch.cat([emb(torch.tensor(before)), feats[0], emb(torch.tensor(after))])[None]
    mask = torch.ones(1, seq.shape[1], dtype=torch.bool)
    start, length = torch.tensor([len(before)]), torch.tensor([64])
    ref, _ = engine.runner.prefill(seq, mask, start, length, None)
    got, state = engine.runner.prefill(seq, mask, start, length, FastVSpec(layer=2, keep=64, rule="dart"))
    assert state.fastv_positions.shape[1] == seq.shape[1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and through the engine: the same answers as method none
    full, _ = engine.answer(pixels[:4], QUESTIONS[:4], IDS[:4], method="dart", keep_tokens=64, max_new_tokens=6)
    none, _ = engine.answer(pixels[:4], QUESTIONS[:4], IDS[:4], method="none", max_new_tokens=6)
    assert full.token_ids == none.token_ids
    assert full.flops[0]["llm_prefill"] == none.flops[0]["llm_prefill"] and full.flops[0]["pruner"] == 0.0


def test_engine_dart_flops(engine: LlavaEngine, pixels):
    dart, _ = engine.answer(pixels[:2], QUESTIONS[:2], IDS[:2], method="dart", dart_count="budget", keep_tokens=8, max_new_tokens=4)
    fastv, _ = engine.answer(pixels[:2], QUESTIONS[:2], IDS[:2], method="fastv", keep_tokens=8, max_new_tokens=4)
    none, _ = engine.answer(pixels[:2], QUESTIONS[:2], IDS[:2], method="none", max_new_tokens=4)
    tc = engine.config.text_config
    for i in range(2):
        f = dart.flops[i]
        assert f["llm_prefill"] < none.flops[i]["llm_prefill"]
        if dart.new_tokens[i] == fastv.new_tokens[i]:  # same layer accounting as FastV at the same cut
            assert f["llm_prefill"] == fastv.flops[i]["llm_prefill"]
            assert f["llm_decode"] == fastv.flops[i]["llm_decode"]
        n_text = dart.prefill_tokens[i] - len(engine._prompt_ids(QUESTIONS[i], None)[0]) - 64
        kv_dim = tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads)
        assert f["pruner"] == dart_flops(64, tc.hidden_size, 8, kv_dim=kv_dim, n_text=n_text)
        parts = sum(v for k, v in f.items() if k not in ("total", "reference_total"))
        assert f["total"] == pytest.approx(parts)
        assert f["reference_total"] == none.flops[i]["reference_total"]
    with pytest.raises(ValueError):
        engine.generate(torch.zeros(1, 64, engine.config.vision_config.hidden_size), ["q"], method="dart",
                        keep_tokens=8, dart_layer=3)  # fmt: skip
