"""Pruners before the projector and the vision stage they read from."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors.pruners import (  # noqa: E402
    prune,
    prune_visionzip,
    visionzip_split,
)
from actors.vision import VisionBatch, encode_images  # noqa: E402

N, DV, HD = 64, 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def synthetic(b: int = 3, seed: int = 0) -> VisionBatch:
    g = torch.Generator().manual_seed(seed)
    return VisionBatch(
        patch_features=torch.randn(b, N, DV, generator=g),
        cls_attention=torch.rand(b, N, generator=g),
        keys=torch.randn(b, N, HD, generator=g),  # head-mean keys: head_dim wide
        cls_feature=torch.randn(b, DV, generator=g),
        cls_attention_next=torch.rand(b, N, generator=g),
    )


def check_partition(out, vision: VisionBatch, *, kept_ascending: bool = True) -> None:
    """kept + discarded = every patch once, discarded ascending (kept too unless told), rows gathered right."""
    for b in range(len(vision)):
        kept, dropped = out.kept_indices[b], out.discarded_indices[b]
        assert torch.all(dropped[1:] > dropped[:-1])
        assert not kept_ascending or torch.all(kept[1:] > kept[:-1])
        assert sorted(kept.tolist() + dropped.tolist()) == list(range(N))
        torch.testing.assert_close(out.discarded[b], vision.patch_features[b, dropped])
        if out.retained.shape[1] == kept.shape[0]:  # not VisionZip: retained = the kept rows, in order
            torch.testing.assert_close(out.retained[b], vision.patch_features[b, kept])


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_none_and_fastv_keep_everything_before_the_projector(method):
    v = synthetic()
    out = prune(v, method, 8, ["a", "b", "c"], ["q"] * 3)
    assert out.kept_indices.shape == (3, N) and out.discarded.shape == (3, 0, DV)
    torch.testing.assert_close(out.retained, v.patch_features)


def test_random_is_seeded_by_item_id():
    v = synthetic()
    a = prune(v, "random", 8, ["x", "y", "x"], ["q"] * 3)
    b = prune(v, "random", 8, ["x", "y", "x"], ["q"] * 3)
    check_partition(a, v)
    assert torch.equal(a.kept_indices, b.kept_indices)  # reruns agree
    assert torch.equal(a.kept_indices[0], a.kept_indices[2])  # same id, same draw
    assert not torch.equal(a.kept_indices[0], a.kept_indices[1])
    torch.testing.assert_close(a.retained[1], v.patch_features[1, a.kept_indices[1]])


@pytest.mark.parametrize(("keep", "split"), [(64, (54, 10)), (8, (7, 1)), (16, (14, 2)), (1, (1, 0))])
def test_visionzip_split_follows_54_to_10(keep, split):
    assert visionzip_split(keep) == split
    assert visionzip_split(128) == (108, 20) and visionzip_split(192) == (162, 30)


def test_visionzip_dominant_and_contextual_merge():
    v = synthetic(b=2)
    keep = 16  # CLS + 13 dominant patches + 2 contextual
    out = prune_visionzip(v, keep)
    assert out.retained.shape == (2, keep, DV)
    check_partition(out, v)
    for b in range(2):
        dominant = v.cls_attention[b].topk(13).indices.sort().values
        assert torch.equal(out.kept_indices[b], dominant)
        torch.testing.assert_close(out.retained[b, 0], v.cls_feature[b])
        torch.testing.assert_close(out.retained[b, 1:14], v.patch_features[b, dominant])
        # brute-force contextual merge: 2 strided targets among the 51 others, the rest by key cosine
        rest = out.discarded_indices[b]
        targets = rest[torch.arange(0, 51, 25)[:2]]
        sources = [int(i) for i in rest if i not in targets]
        keys = torch.nn.functional.normalize(v.keys[b], dim=-1)
        for c, t in enumerate(targets.tolist()):
            group = [s for s in sources if int((keys[s] @ keys[targets].T).argmax()) == c]
            want = v.patch_features[b, t] + (v.patch_features[b, group].mean(0) if group else 0)
            torch.testing.assert_close(out.retained[b, 14 + c], want, rtol=1e-5, atol=1e-5)


def test_encode_images_matches_native_tower():
    """Feature-layer patches, CLS attention (head-summed) and head-mean keys == the native CLIP forward's."""
    from actors.tiny import build_tiny_llava

    model, _ = build_tiny_llava(vision_layers=3, seed=1, init_std=0.2)
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    pixels = torch.randn(2, 3, 64, 64)
    got = encode_images(tower, pixels, feature_layer=-2)
    with torch.no_grad():
        native = tower(pixels, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(got.patch_features, native.hidden_states[-2][:, 1:])
    torch.testing.assert_close(got.cls_feature, native.hidden_states[-2][:, 0])
    torch.testing.assert_close(got.cls_attention, native.attentions[1][:, :, 0, 1:].sum(1))
    layer = tower.encoder.layers[1]
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(native.hidden_states[1]))
    # VisionZip's metric: raw keys [B, H, T, hd] averaged over heads (VisionZip visionzip/utils.py L89)
    heads = layer.self_attn.num_heads
    by_head = keys.view(2, 65, heads, -1).transpose(1, 2)  # [B, H, T, hd]
    torch.testing.assert_close(got.keys, by_head.mean(1)[:, 1:])
    assert got.keys.shape == (2, 64, 64 // heads)
    assert got.patch_features.shape == (2, 64, 64) and got.cls_attention.shape == (2, 64)
