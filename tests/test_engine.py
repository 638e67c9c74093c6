"""LlavaEngine on a tiny random LLaVA: native equivalence, batch independence, caption splice, FastV, loading."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors.engine import METHODS, LlavaEngine, resolve_keep_tokens  # noqa: E402
from actors.prompt import build_prompt  # noqa: E402
from actors.tiny import build_tiny_llava  # noqa: E402

QUESTIONS = [
    "What color is the circle?",
    "How many squares are there?",
    "Is there a red cross?",
    "What shape is in row 1, column 2?",
    "What shape is the green object?",
    "Is there a blue ring?",
    "How many triangles are there?",
    "What color is the diamond?",
]
CAPTIONS = [
    None,
    "the circle is red.",
    "",
    "there are two squares.",
    None,
    "there is no blue ring.",
    None,
    "  ",
]
IDS = [f"item-{i}" for i in range(8)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(path, text_layers=3, seed=3, init_std=0.2)
    return str(path)


@pytest.fixture(scope="module")
def engine(model_dir: str) -> LlavaEngine:
    return LlavaEngine.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]


def test_resolve_keep_tokens():
    assert resolve_keep_tokens(576) == 576
    assert resolve_keep_tokens(576, prune_rate=0.875) == 72
    assert resolve_keep_tokens(64, prune_rate=0.875) == 8
    assert resolve_keep_tokens(64, keep_tokens=100) == 64
    with pytest.raises(ValueError):
        resolve_keep_tokens(64, keep_tokens=8, prune_rate=0.5)
    with pytest.raises(ValueError):
        resolve_keep_tokens(64, prune_rate=1.0)


def test_method_none_matches_native_llava(engine: LlavaEngine, images):
    """Our decoder loop on hand-built sequences == LlavaForConditionalGeneration (logits and greedy ids)."""
    proc = engine.processor
    for i in (0, 3):
        enc = proc(
            images=images[i : i + 1], text=[build_prompt(QUESTIONS[i], CAPTIONS[i])], return_tensors="pt"
        )
        with torch.no_grad():
            native_logits = engine.model(**enc).logits[0, -1]
            native_ids = engine.model.generate(**enc, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        native_ids = native_ids[0, enc["input_ids"].shape[1] :].tolist()

        vision = engine.encode_images(engine.preprocess(images[i : i + 1]))
        engine.keep_last_state = True
        res = engine.generate(vision.patch_features, [QUESTIONS[i]], [CAPTIONS[i]], max_new_tokens=8)
        engine.keep_last_state = False
        assert res.prefill_tokens[0] == enc["input_ids"].shape[1]
        ours = res.token_ids[0]
        assert ours == native_ids[: len(ours)]
        # first-step logits through our own prefill
        emb = engine.model.get_input_embeddings()
        before, after = engine._prompt_ids(QUESTIONS[i], CAPTIONS[i])
        seq = torch.cat(
            [emb(torch.tensor(before)), engine.project(vision.patch_features[0]), emb(torch.tensor(after))]
        )
        n = seq.shape[0]
        logits, _ = engine.runner.prefill(
            seq[None], torch.ones(1, n, dtype=torch.bool), torch.tensor([len(before)]), torch.tensor([64])
        )
        torch.testing.assert_close(logits[0], native_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_8_equals_one_by_one(engine: LlavaEngine, images, method: str):
    """An item's answer must not depend on its batch-mates (left padding, masks, positions, FastV)."""
    pixels = engine.preprocess(images)
    batched, pruned = engine.answer(
        pixels, QUESTIONS, IDS, CAPTIONS, method=method, keep_tokens=8, max_new_tokens=10
    )
    assert len(set(map(tuple, batched.token_ids))) >= 3, "outputs too uniform to tell items apart"
    for i in range(8):
        single, single_pruned = engine.answer(
            pixels[i : i + 1], QUESTIONS[i : i + 1], IDS[i : i + 1], CAPTIONS[i : i + 1],
            method=method, keep_tokens=8, max_new_tokens=10,
        )  # fmt: skip
        assert single.token_ids[0] == batched.token_ids[i], (method, i)
        assert torch.equal(single_pruned.kept_indices[0], pruned.kept_indices[i])
        assert single.flops[0] == batched.flops[i]
    expected_visual = 64 if method in ("none", "fastv", "dart") else 8  # the in-LLM pruners keep all here
    assert pruned.retained.shape[:2] == (8, expected_visual)


def test_caption_splice_changes_prompt(engine: LlavaEngine):
    feats = torch.randn(1, 8, engine.config.vision_config.hidden_size)
    plain = engine.generate(feats, ["What color is the circle?"], [None], max_new_tokens=2)
    empty = engine.generate(feats, ["What color is the circle?"], ["   "], max_new_tokens=2)
    abstained = engine.generate(feats, ["What color is the circle?"], ["."], max_new_tokens=2)
    cap = engine.generate(feats, ["What color is the circle?"], ["the circle is red."], max_new_tokens=2)
    # a blank caption, or one with no words (a caption model that abstains stops at '.'), splices nothing
    assert plain.prefill_tokens == empty.prefill_tokens == abstained.prefill_tokens
    assert plain.token_ids == empty.token_ids == abstained.token_ids
    assert abstained.flops[0]["llm_prefill"] == plain.flops[0]["llm_prefill"]
    # "additional information : the circle is red ." = 8 extra words
    assert cap.prefill_tokens[0] - plain.prefill_tokens[0] == 8
    before, after = engine._prompt_ids("What color is the circle?", "the circle is red.")
    assert engine.tokenizer.decode(after).startswith("additional information : the circle is red.")
    assert cap.flops[0]["llm_prefill"] > plain.flops[0]["llm_prefill"]


def test_fastv_compacts_hidden_and_kv(engine: LlavaEngine, images, model_dir: str):
    pixels = engine.preprocess(images[:2])
    engine.keep_last_state = True
    try:
        res, _ = engine.answer(pixels, QUESTIONS[:2], IDS[:2], method="fastv", keep_tokens=8, fastv_layer=2)
        state = engine.last_state
        width = max(res.prefill_tokens)
        new = res.new_tokens
        grown = max(new) - 1  # decode steps run
        assert [k.shape[2] for k in state.keys] == [width + grown] * 2 + [width - 64 + 8 + grown]
        assert state.fastv_positions.shape == (2, width - 56)
        # kept ranking == head-mean attention of the last token in layer K-1 (native, output_attentions)
        proc = engine.processor
        enc = proc(images=images[:1], text=[build_prompt(QUESTIONS[0])], return_tensors="pt")
        from transformers import LlavaForConditionalGeneration

        native = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager")
        with torch.no_grad():  # output_attentions needs the native model's eager attention
            att = native(**enc, output_attentions=True).attentions[1][0, :, -1]  # layer K-1 = 1
        start = (enc["input_ids"][0] == engine.image_token_id).nonzero()[0, 0].item()
        top = att.mean(0)[start : start + 64].topk(8).indices.sort().values + start
        pad = width - res.prefill_tokens[0]
        kept = state.fastv_positions[0] - pad
        kept_img = kept[(kept >= start) & (kept < start + 64)]
        assert torch.equal(kept_img, top)
    finally:
        engine.keep_last_state, engine.last_state = False, None
    # keeping every image token through the compaction path == no pruning
    full, _ = engine.answer(pixels, QUESTIONS[:2], IDS[:2], method="fastv", keep_tokens=64, max_new_tokens=6)
    none, _ = engine.answer(pixels, QUESTIONS[:2], IDS[:2], method="none", max_new_tokens=6)
    assert full.token_ids == none.token_ids
    assert res.flops[0]["llm_prefill"] < none.flops[0]["llm_prefill"]


def test_load_from_file_url_and_s3(
    model_dir: str, engine: LlavaEngine, s3_server, tmp_bucket, tmp_path, images
):
    from actors import loading

    for root, _, files in os.walk(model_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), model_dir)
            s3_server.client.upload_file(os.path.join(root, name), tmp_bucket, f"models/tiny/{rel}")
    url = f"s3://{tmp_bucket}/models/tiny"
    remote = LlavaEngine.from_pretrained(url, cache_dir=str(tmp_path / "cache"))
    assert remote.model_id == url
    assert loading.local_model_dir(url, str(tmp_path / "cache")).startswith(str(tmp_path / "cache"))
    # once per process: the same directory comes back, nothing is downloaded again
    s3_server.client.delete_object(Bucket=tmp_bucket, Key="models/tiny/config.json")
    assert LlavaEngine.from_pretrained(url, cache_dir=str(tmp_path / "cache")).model_id == url
    by_file = LlavaEngine.from_pretrained(f"file://{model_dir}")
    pixels = engine.preprocess(images[:2])
    want, _ = engine.answer(pixels, QUESTIONS[:2], IDS[:2], method="random", keep_tokens=16)
    for other in (remote, by_file):
        got, _ = other.answer(pixels, QUESTIONS[:2], IDS[:2], method="random", keep_tokens=16)
        assert got.token_ids == want.token_ids
    with pytest.raises(FileNotFoundError):
        LlavaEngine.from_pretrained(str(tmp_path / "missing"))


def test_vision_only_engine_encodes_and_prunes_like_the_full_one(model_dir: str, engine: LlavaEngine, images):
    """The captioner tier's engine: tower + projector from the checkpoint, the LLM never loaded."""
    vis = LlavaEngine.from_pretrained(model_dir, vision_only=True)
    assert vis.vision_only and not engine.vision_only
    assert all(p.is_meta for p in vis.model.model.language_model.parameters())
    assert not any(p.is_meta for p in vis.model.model.vision_tower.parameters())
    pixels = engine.preprocess(images[:4])
    a, b = engine.encode_images(pixels), vis.encode_images(pixels)
    assert torch.equal(a.patch_features, b.patch_features)
    for method in ("random", "visionzip", "prumerge_plus"):
        pa = engine.prune(a, method, 8, IDS[:4], QUESTIONS[:4])
        pb = vis.prune(b, method, 8, IDS[:4], QUESTIONS[:4])
        assert all(torch.equal(x, y) for x, y in zip(pa.retained, pb.retained, strict=True))
    assert torch.equal(engine.project(a.patch_features), vis.project(b.patch_features))
    with pytest.raises(RuntimeError, match="vision_only"):
        vis.generate(b.patch_features, QUESTIONS[:4])


def test_vision_only_key_names_across_checkpoint_layouts(model_dir: str, tmp_path):
    from actors.loading import _model_key, load_llava_vision_only

    patch, proj = "model.vision_tower.embeddings.patch_embedding.weight", "model.multi_modal_projector.linear_1.weight"
    wanted = {patch, proj}
    # transformers v5 saves llava-hf's names; older llava-hf checkpoints nest the tower under vision_model
    assert _model_key("vision_tower.embeddings.patch_embedding.weight", wanted) == patch
    assert _model_key("vision_tower.vision_model.embeddings.patch_embedding.weight", wanted) == patch
    assert _model_key("multi_modal_projector.linear_1.weight", wanted) == proj
    assert _model_key("language_model.model.layers.0.mlp.up_proj.weight", wanted) is None
    # a checkpoint without the tower is refused with a clear error, not loaded half-random
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no_tower"
    shutil.copytree(model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        load_llava_vision_only(str(broken), dtype=torch.float32)


@pytest.fixture(scope="module")
def eager_engine(engine: LlavaEngine) -> LlavaEngine:
    """The same weights through the written-out (eager) attention: the reference of the fused path."""
    return LlavaEngine(engine.model, engine.processor, model_id="eager", attention="eager")


def test_fused_vision_tower_equals_eager(engine: LlavaEngine, eager_engine: LlavaEngine, images):
    pixels = engine.preprocess(images)
    fused, ref = engine.encode_images(pixels), eager_engine.encode_images(pixels)
    for name in ("patch_features", "cls_attention", "keys", "cls_feature"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(engine.cls_score(fused), eager_engine.cls_score(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_fused_llm_equals_eager_for_every_method(engine: LlavaEngine, eager_engine: LlavaEngine, images, method):
    """SDPA prefill + decode (FastV's and DART's row scored on its own) == the eager reference: same tokens,
    same kept positions, logits to float tolerance, on a left-padded batch with captions."""
    # one pruned batch for both: the tower is compared above, and CDPruner's unconditional DPP (diag(S) = 1)
    # breaks its first tie on float noise, which would make the two LLM inputs differ
    pruned = engine.prune(engine.encode_images(engine.preprocess(images)), method, 8, IDS, QUESTIONS)
    fused = engine.generate(pruned.retained, QUESTIONS, CAPTIONS, method=method, keep_tokens=8, max_new_tokens=10)
    ref = eager_engine.generate(pruned.retained, QUESTIONS, CAPTIONS, method=method, keep_tokens=8,
                                max_new_tokens=10)
    assert fused.token_ids == ref.token_ids
    assert fused.pad_tokens == ref.pad_tokens and max(fused.pad_tokens) > 0 and min(fused.pad_tokens) == 0
    for eng in (engine, eager_engine):
        eng.keep_last_state = True
    try:
        engine.generate(pruned.retained, QUESTIONS, CAPTIONS, method=method, keep_tokens=8, max_new_tokens=3)
        eager_engine.generate(pruned.retained, QUESTIONS, CAPTIONS, method=method, keep_tokens=8, max_new_tokens=3)
        a, b = engine.last_state, eager_engine.last_state
        assert (a.fastv_positions is None) == (b.fastv_positions is None)
        if a.fastv_positions is not None:
            assert torch.equal(a.fastv_positions, b.fastv_positions)
        assert a.lengths == b.lengths
        for ka, kb, ma, mb in zip(a.keys, b.keys, a.masks, b.masks, strict=True):
            assert torch.equal(ma, mb)
            torch.testing.assert_close(ka[ma[:, None, :, None].expand_as(ka)], kb[mb[:, None, :, None].expand_as(kb)],
                                       rtol=1e-4, atol=1e-5)
    finally:
        for eng in (engine, eager_engine):
            eng.keep_last_state, eng.last_state = False, None


def test_kv_cache_is_preallocated_and_written_in_place(engine: LlavaEngine, images):
    """Prefill reserves prompt + new-token slots; decode steps write into them (no reallocation); a caller
    decoding past the reservation still gets the same tokens (the cache grows)."""
    pixels = engine.preprocess(images[:3])
    vision = engine.encode_images(pixels)
    emb = engine.model.get_input_embeddings()
    res = engine.generate(vision.patch_features, QUESTIONS[:3], max_new_tokens=6, ignore_eos=True)
    b, width = 3, max(res.prefill_tokens)
    seqs = []
    for i in range(b):
        before, after = engine._prompt_ids(QUESTIONS[i], None)
        seqs.append(torch.cat([emb(torch.tensor(before)), engine.project(vision.patch_features[i]),
                               emb(torch.tensor(after))]))
    embeds = torch.zeros(b, width, seqs[0].shape[-1])
    mask = torch.zeros(b, width, dtype=torch.bool)
    starts = []
    for i, s in enumerate(seqs):
        embeds[i, width - len(s):], mask[i, width - len(s):] = s, True
        starts.append(width - len(s) + len(engine._prompt_ids(QUESTIONS[i], None)[0]))
    for reserve in (5, 1):  # 5: every step fits; 1: steps 2.. grow the buffers
        logits, state = engine.runner.prefill(embeds, mask, torch.tensor(starts), torch.tensor([64] * b),
                                              max_new_tokens=reserve)
        assert all(k.shape[2] == width + reserve for k in state.key_cache)
        ptrs = [k.data_ptr() for k in state.key_cache]
        tokens = []
        for step in range(6):
            if step:
                logits = engine.runner.decode_step(emb(tokens[-1])[:, None], state)
                assert state.lengths == [width + step] * len(state.lengths)
                if step <= reserve:
                    assert [k.data_ptr() for k in state.key_cache] == ptrs
            tokens.append(logits.argmax(-1))
        assert torch.stack(tokens, 1).tolist() == res.token_ids
