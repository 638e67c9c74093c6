"""PruMerge+ (ACCM's base pruner) against the rule of ACCM's public code, written out independently here.

Reference: ASGO-MM/ACCM @ 50f1bd8, llava/model/multimodal_encoder/clip_encoder.py,
``token_prune_merge_advanced_plus`` (L132-265) and ``outlier_dectection`` (L49-62). Each rule below is
restated in a comment next to the code that checks it, on inputs whose answer is known by hand.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors.pruners import (  # noqa: E402
    TEXT_PICK_TABLE,
    TextGuide,
    iqr_outliers,
    item_generator,
    prune,
    text_pick_count,
)
from actors.vision import VisionBatch, encode_images  # noqa: E402

N, DV, P = 64, 16, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def batch(score: torch.Tensor, projected: torch.Tensor | None = None, seed: int = 0) -> VisionBatch:
    g = torch.Generator().manual_seed(seed)
    b = score.shape[0]
    return VisionBatch(
        patch_features=torch.randn(b, N, DV, generator=g),
        cls_attention=torch.rand(b, N, generator=g),
        keys=torch.randn(b, N, 4, generator=g),
        cls_feature=torch.randn(b, DV, generator=g),
        cls_attention_next=score,
        projected=projected,
    )


class FixedText:
    """A text guide stand-in whose question embeddings are given (only embed_questions is read)."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds

    def embed_questions(self, questions):
        e = self.embeds[: len(questions)]
        return e / e.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- an independent reference


def reference_keep(score, keep, text_embed=None, patches=None, text_num=0, farthest=True, pad_perm=None):
    """ACCM's rule for one item, restated (numpy for the quartiles, as their outlier_dectection)."""
    n = score.shape[0]
    # L49-62: ratio = #(score > Q3 + 1.5 IQR) / N with numpy percentiles; L219: topk(int(N * ratio))
    a = score.numpy().astype(np.float32)
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)
    cls_idx = torch.topk(score, int(n * ratio), dim=0, largest=True).indices
    parts = []
    if text_embed is not None:
        # L161-163, L180: both L2-normalised; L186-190: squared distances, topk (largest unless nearest)
        t = text_embed / text_embed.norm()
        p = patches / patches.norm(dim=1, keepdim=True)
        dist = (t**2).sum() + (p**2).sum(1) - 2 * (p @ t)
        parts.append(dist.topk(text_num, largest=farthest).indices)
    parts.append(cls_idx)
    # L227-233: cat(text, cls) -> unique; over budget keep the last `keep`; unique again (sorted)
    u = torch.unique(torch.cat(parts))
    if u.shape[0] > keep:
        u = u[-keep:]
    u = torch.unique(u)
    need = keep - u.shape[0]
    if need == 0:
        return u
    # L246-252: stride from 0 with step ceil(N / need), minus the chosen ones, appended in order
    seq = torch.arange(0, n, math.ceil(n / need))
    out = torch.cat([u, torch.tensor([x for x in seq.tolist() if x not in u.tolist()], dtype=torch.long)])
    if out.shape[0] < keep:
        # L253-260: random patches from the rest (ascending all_index[mask]) by a permutation
        rest = torch.arange(n)[~torch.isin(torch.arange(n), out)]
        out = torch.cat([out, rest[pad_perm(rest.shape[0])[: keep - out.shape[0]]]])
    return out


def seeded(item_id):
    return lambda m: torch.randperm(m, generator=item_generator(item_id))


# --------------------------------------------------------------------------- the rule's pieces


def test_outliers_count_and_order():
    # 60 flat scores and four spikes: Q1 = Q3 = 0.1 -> every spike is an outlier, ranked largest first
    s = torch.full((N,), 0.1)
    s[[7, 30, 41, 63]] = torch.tensor([0.5, 0.9, 0.3, 0.7])
    assert iqr_outliers(s).tolist() == [30, 63, 7, 41]
    # no spread above Q3 + 1.5 IQR: nothing
    assert iqr_outliers(torch.linspace(0, 1, N)).numel() == 0


def test_text_pick_count_table_and_interpolation():
    for k, t in TEXT_PICK_TABLE:  # ACCM L152-153: 18->12, 36->20, 72->40, 144->70, 288->150
        assert text_pick_count(k) == t
    assert text_pick_count(54) == 30  # halfway 36..72 -> halfway 20..40
    assert text_pick_count(8) == round(8 * 12 / 18) == 5
    assert text_pick_count(576) == 300


def test_cls_only_stride_then_random_in_code_order():
    score = torch.full((1, N), 0.01)
    score[0, [50, 3, 17]] = torch.tensor([1.0, 0.9, 0.8])  # three outliers
    v = batch(score)
    keep = 8
    out = prune(v, "prumerge_plus", keep, ["x"], ["q"])
    # union [3, 17, 50]; need 5 -> step ceil(64/5) = 13 -> 0, 13, 26, 39, 52 (none chosen yet); 8 in all
    assert out.kept_indices[0].tolist() == [3, 17, 50, 0, 13, 26, 39, 52]
    assert out.kept_indices[0].tolist() == reference_keep(score[0], keep).tolist()
    torch.testing.assert_close(out.retained[0], v.patch_features[0, out.kept_indices[0]])
    assert torch.all(out.discarded_indices[0][1:] > out.discarded_indices[0][:-1])
    asc = prune(v, "prumerge_plus", keep, ["x"], ["q"], order="ascending")
    assert asc.kept_indices[0].tolist() == sorted(out.kept_indices[0].tolist())


def test_stride_hits_chosen_then_random_pad_seeded_by_item():
    score = torch.full((1, N), 0.01)
    score[0, [0, 16, 32, 48, 5]] = 1.0  # five outliers, four on the stride below
    keep = 9
    # need 4 -> step 16 -> 0, 16, 32, 48: all chosen already -> 4 random patches from the rest
    out = prune(batch(score), "prumerge_plus", keep, ["item-7"], ["q"])
    want = reference_keep(score[0], keep, pad_perm=seeded("item-7"))
    assert out.kept_indices[0].tolist() == want.tolist()
    assert out.kept_indices[0, :5].tolist() == [0, 5, 16, 32, 48]
    again = prune(batch(score), "prumerge_plus", keep, ["item-7"], ["q"])
    assert torch.equal(again.kept_indices, out.kept_indices)


def test_over_budget_keeps_the_highest_indices():
    score = torch.full((1, N), 0.01)
    hot = [2, 9, 20, 33, 40, 51, 60]
    score[0, hot] = torch.linspace(1.0, 0.5, len(hot))  # 7 outliers, budget 4
    out = prune(batch(score), "prumerge_plus", 4, ["x"], ["q"])
    assert out.kept_indices[0].tolist() == [33, 40, 51, 60]  # L232: unique_indice[-select_num:]


def _text_case(farthest_expected: list[int], nearest_expected: list[int]):
    """Projected patches on two axes: the question points along e0; patches along -e0 are farthest."""
    projected = torch.zeros(1, N, P)
    projected[0, :, 1] = 1.0  # orthogonal to the question: distance 2
    projected[0, nearest_expected, 0] = 5.0  # close to e0
    projected[0, farthest_expected, 0] = -5.0  # opposite
    text = torch.zeros(1, P)
    text[0, 0] = 1.0
    return projected, FixedText(text)


@pytest.mark.parametrize("pick", ["nearest", "farthest"])
def test_text_picks_nearest_or_farthest(pick):
    near, far = [10, 11, 12, 13, 14], [40, 41, 42, 43, 44]
    projected, guide = _text_case(far, near)
    score = torch.full((1, N), 0.01)
    score[0, 60] = 1.0  # one CLS outlier
    keep = 8  # text_pick_count(8) = 5
    out = prune(batch(score, projected), "prumerge_plus", keep, ["x"], ["q"], guide, text_pick=pick)
    picked = near if pick == "nearest" else far
    want = reference_keep(
        score[0], keep, torch.tensor([1.0] + [0.0] * (P - 1)), projected[0], 5, farthest=pick == "farthest"
    )
    assert out.kept_indices[0].tolist() == want.tolist()
    assert out.kept_indices[0, :6].tolist() == sorted(picked + [60])
    assert out.notes == []
    # the discarded rows of the projected patches, ascending, as ACCM's caption path reads them (L269-275)
    torch.testing.assert_close(out.discarded_projected[0], projected[0, out.discarded_indices[0]])


def test_text_pick_names_are_checked():
    v = batch(torch.rand(1, N))
    with pytest.raises(ValueError, match="text_pick"):
        prune(v, "prumerge_plus", 8, ["x"], ["q"], text_pick="closest")
    with pytest.raises(ValueError, match="cls_attention_next"):
        prune(VisionBatch(v.patch_features, v.cls_attention, v.keys, v.cls_feature), "accm", 8, ["x"], ["q"])


def test_batch_of_16_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    score = torch.rand(16, N, generator=g) ** 8  # heavy tail: a few outliers each
    projected = torch.randn(16, N, P, generator=g)
    guide = FixedText(torch.randn(16, P, generator=g))
    v = batch(score, projected)
    ids = [f"i{j}" for j in range(16)]
    qs = ["q"] * 16
    full = prune(v, "prumerge_plus", 12, ids, qs, guide)
    for j in range(16):
        one = prune(
            v.select([j]), "prumerge_plus", 12, ids[j : j + 1], qs[:1], FixedText(guide.embeds[j : j + 1])
        )
        assert torch.equal(one.kept_indices[0], full.kept_indices[j])
        t = guide.embeds[j]
        want = reference_keep(
            score[j], 12, t, projected[j], text_pick_count(12), farthest=False, pad_perm=seeded(ids[j])
        )
        assert full.kept_indices[j].tolist() == want.tolist()


# --------------------------------------------------------------------------- the vision stage's inputs


def tiny_tower(layers: int = 3):
    from actors.tiny import build_tiny_llava

    model, _ = build_tiny_llava(vision_layers=layers, seed=1, init_std=0.2)
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    return tower


def hooked_reference_score(tower, pixels, layer_index):
    """ACCM L140-141 + L200-210: forward hooks on q_proj/k_proj of the layer after the feature layer, then
    ONE head over the full width: softmax(q kᵀ * C**-0.5) over all tokens, row 0 (CLS), columns 1:."""
    seen = {}
    layer = tower.encoder.layers[layer_index].self_attn
    hooks = [
        layer.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
        layer.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o)),
    ]
    try:
        with torch.no_grad():
            native = tower(pixels, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    c = seen["q"].shape[-1]
    attn = torch.softmax((seen["q"] @ seen["k"].transpose(-2, -1)) * c**-0.5, dim=-1)  # [B, T, T]
    return attn[:, 0, 1:], native


def test_cls_score_is_one_full_width_head_of_the_next_layer():
    tower = tiny_tower(3)
    pixels = torch.randn(2, 3, 64, 64)
    want, native = hooked_reference_score(tower, pixels, 2)  # feature layer -2 of 3 -> next = layers[2]
    got = encode_images(tower, pixels, feature_layer=-2)
    torch.testing.assert_close(got.cls_attention_next, want, rtol=1e-5, atol=1e-6)
    # explicitly from the next layer's weights and its LN1 input (hidden_states[-2]), biases included
    layer = tower.encoder.layers[2]
    x = layer.layer_norm1(native.hidden_states[-2])
    q = x @ layer.self_attn.q_proj.weight.T + layer.self_attn.q_proj.bias
    k = x @ layer.self_attn.k_proj.weight.T + layer.self_attn.k_proj.bias
    explicit = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)[:, 0, 1:]
    torch.testing.assert_close(got.cls_attention_next, explicit, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        got.cls_attention_next, got.cls_attention / got.cls_attention.sum(1, keepdim=True)
    )


def test_cls_score_falls_back_to_the_feature_layer_when_it_is_the_last():
    tower = tiny_tower(3)
    pixels = torch.randn(1, 3, 64, 64)
    want, _ = hooked_reference_score(tower, pixels, 2)  # feature layer -1 = layers[2] itself
    got = encode_images(tower, pixels, feature_layer=-1)
    torch.testing.assert_close(got.cls_attention_next, want, rtol=1e-5, atol=1e-6)


def tiny_clip(hidden: int = 64):
    from transformers import CLIPConfig, CLIPModel

    from actors.tiny import build_tokenizer

    tok = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=77, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=8),
        projection_dim=P,
    )  # fmt: skip
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip.config._attn_implementation = "eager"
    return TextGuide(clip, tok)


def test_projected_patches_are_the_last_layer_through_post_layernorm_and_projection():
    tower, guide = tiny_tower(3), tiny_clip()
    pixels = torch.randn(2, 3, 64, 64)
    got = encode_images(tower, pixels, feature_layer=-2, projection=guide)
    with torch.no_grad():
        native = tower(pixels, output_hidden_states=True)
        want = guide.visual_projection(guide.post_layernorm(native.last_hidden_state))[:, 1:]
    torch.testing.assert_close(got.projected, want, rtol=1e-5, atol=1e-5)
    plain = encode_images(tower, pixels, feature_layer=-2)
    torch.testing.assert_close(got.cls_attention_next, plain.cls_attention_next, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.patch_features, plain.patch_features)


def test_question_first_line_and_77_token_truncation_with_eos():
    guide = tiny_clip()
    tok = guide.tokenizer
    q = "What color is the circle?"
    assert guide.question_ids(
        q + "\nAnswer the question using a single word or phrase."
    ) == guide.question_ids(q)
    long_q = " ".join(["red circle"] * 60)
    ids = guide.question_ids(long_q)
    full = tok(long_q)["input_ids"]
    # L173-176: input_ids[:, :77], then input_ids[:, 76] = EOS
    assert len(full) > 77 and ids == full[:76] + [tok.eos_token_id]
    assert guide.flops_spec([long_q])[0]["question_tokens"] == 77
    e = guide.embed_questions([q, long_q])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(guide.embed_questions([long_q])[0], e[1])  # one at a time: no batch effects


def test_engine_prune_fills_in_the_score_and_accepts_text_pick():
    from actors.engine import LlavaEngine
    from actors.tiny import build_tiny_llava

    model, processor = build_tiny_llava(vision_layers=3, seed=2, init_std=0.2)
    model.config._attn_implementation = "eager"
    engine = LlavaEngine(model, processor)
    pixels = torch.randn(3, 3, 64, 64)
    vision = engine.encode_images(pixels)
    assert vision.cls_attention_next is None and vision.projected is None  # left to prune
    full = encode_images(engine._tower, pixels, feature_layer=-2)
    torch.testing.assert_close(engine.cls_score(vision), full.cls_attention_next)
    ids, qs = ["a", "b", "c"], ["q1", "q2", "q3"]
    a = engine.prune(vision, "prumerge_plus", 8, ids, qs)
    b = prune(full, "prumerge_plus", 8, ids, qs)
    assert torch.equal(a.kept_indices, b.kept_indices)
    assert vision.cls_attention_next is None  # the caller's batch is not changed
    for pick in ("nearest", "farthest"):
        assert engine.prune(vision, "accm", 8, ids, qs, text_pick=pick).retained.shape == (3, 8, 64)
    with pytest.raises(ValueError, match="text guide"):
        engine.encode_images(pixels, projected=True)
    engine.text_guide = tiny_clip()
    try:
        with_text = engine.encode_images(pixels)
        assert with_text.projected.shape == (3, 64, P) and with_text.cls_attention_next is not None
        out = engine.prune(with_text, "prumerge_plus", 8, ids, qs)
        assert out.notes == [] and out.discarded_projected.shape == (3, 56, P)
        assert engine.vision_layers_for("prumerge_plus") == 3 and engine.vision_layers_for("random") == 2
    finally:
        engine.text_guide = None
    assert engine.vision_layers_for("prumerge_plus") == 2
