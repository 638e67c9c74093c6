"""ACCM caption model: beam search, mapper inputs, persistence, FLOPs (tiny random models, CPU)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

torch = pytest.importorskip("torch")

from actors.captioner import CaptionModel, build_caption_model  # noqa: E402
from actors.tiny import build_tokenizer  # noqa: E402

DV = 24
QUESTIONS = ["What color is the triangle?", "How many circles are there?", "What shape is in row 1, column 3?"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_caption_model(tokenizer, feature_dim=DV, hidden=32, decoder_layers=2, decoder_heads=2,
                               prefix_len=4, mapper_layers=1, mapper_heads=2, max_caption_tokens=8, seed=1)


def test_beam_search_gives_n_distinct_candidates_sorted_by_score(model):
    torch.manual_seed(0)
    out = model.beam_search(torch.randn(3, 56, DV), QUESTIONS, beams=3)
    for caps, ids, scores in zip(out.captions, out.token_ids, out.scores, strict=True):
        assert len(caps) == 3 and len(ids) == 3
        assert len({tuple(i) for i in ids}) == 3, "beams must be distinct token sequences"
        assert scores == sorted(scores, reverse=True)
        assert all(1 <= len(i) <= 8 for i in ids)
    assert out.question_tokens == [len(model.tokenizer(q)["input_ids"]) for q in QUESTIONS]


def test_batched_equals_per_item(model):
    torch.manual_seed(1)
    x = torch.randn(3, 56, DV)
    batched = model.beam_search(x, QUESTIONS)
    for i, q in enumerate(QUESTIONS):
        single = model.beam_search(x[i : i + 1], [q])
        assert single.token_ids[0] == batched.token_ids[i]
        assert single.scores[0] == pytest.approx(batched.scores[i], abs=1e-4)
        assert single.steps[0] == batched.steps[i]


def test_mapper_sees_only_discarded_features(model):
    """The caption depends on the discarded patches the caller passes, nothing else (retained never go in)."""
    torch.manual_seed(2)
    feats = torch.randn(1, 64, DV)
    kept = torch.tensor([3, 9, 17, 30, 41, 50, 58, 63])
    drop = torch.tensor([i for i in range(64) if i not in set(kept.tolist())])
    a = model.mapper(feats[:, drop])
    changed = feats.clone()
    changed[:, kept] = torch.randn(1, len(kept), DV) * 10  # retained patches change, discarded do not
    torch.testing.assert_close(model.mapper(changed[:, drop]), a)
    changed[:, drop[0]] += 1.0  # one discarded patch changes -> the prefix changes
    assert not torch.allclose(model.mapper(changed[:, drop]), a)


def test_caption_training_stops_at_period(tokenizer):
    """A few steps on one fact: beam 1 reproduces it and stops at '.', shorter than the max length."""
    m = build_caption_model(tokenizer, feature_dim=DV, hidden=32, decoder_layers=1, decoder_heads=2,
                            prefix_len=2, mapper_layers=1, mapper_heads=2, max_caption_tokens=12, seed=3).train()
    x = torch.randn(2, 10, DV)
    qs = ["What color is the triangle?", "What color is the ring?"]
    facts = ["the triangle is red.", "the ring is blue."]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = m.caption_loss(x, qs, facts).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    out = m.beam_search(x, qs)
    assert [c[0] for c in out.captions] == facts
    for ids in out.token_ids:
        assert ids[0][-1] == tokenizer.convert_tokens_to_ids(".")
        assert len(ids[0]) == 5 < 12
    assert out.steps == [max(len(i) for i in ids) - 1 for ids in out.token_ids]


def test_save_load_round_trip(model, tmp_path):
    torch.manual_seed(4)
    x = torch.randn(2, 56, DV)
    model.save_pretrained(tmp_path / "cap")
    assert (tmp_path / "cap/decoder/config.json").exists() and (tmp_path / "cap/mapper.safetensors").exists()
    loaded = CaptionModel.from_pretrained(tmp_path / "cap")
    assert loaded.beam_search(x, QUESTIONS[:2]).token_ids == model.beam_search(x, QUESTIONS[:2]).token_ids
    torch.testing.assert_close(loaded.caption_loss(x, QUESTIONS[:2], ["a.", "b."]),
                               model.caption_loss(x, QUESTIONS[:2], ["a.", "b."]))


def test_stock_gpt2_folder_loads_through_the_same_code(tmp_path):
    """A `gpt2`-style checkpoint (random GPT2LMHeadModel + a BPE tokenizer saved locally) drops in as decoder/."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = "the a is red blue triangle what color ? . <|endoftext|>".split()
    bpe = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[], unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(tmp_path / "cap/decoder")
    tok.save_pretrained(tmp_path / "cap/decoder")
    (tmp_path / "cap/accm_captioner.json").write_text(json.dumps(
        {"feature_dim": DV, "hidden": 32, "prefix_len": 3, "mapper_layers": 1, "mapper_heads": 2}))
    m = CaptionModel.from_pretrained(tmp_path / "cap")  # no mapper weights yet: fresh mapper, stock decoder
    assert type(m.decoder).__name__ == "GPT2LMHeadModel"
    assert m.decoder.config._attn_implementation == "eager"
    out = m.beam_search(torch.randn(2, 7, DV), ["what color is the triangle?"] * 2, max_tokens=4)
    assert all(len(c) == 3 for c in out.captions)


@pytest.mark.parametrize("patch_prefix", [False, True])
def test_captioner_flops_match_flop_counter(tokenizer, patch_prefix):
    """pipeline.flops.caption_model_flops == FlopCounterMode over one item's mapper + prefill + beam decode,
    for ClipCap's P-slot prefix and for the patch prefix (M + P slots)."""
    from torch.utils.flop_counter import FlopCounterMode

    from actors.accm import caption_model_dims
    from pipeline.flops import caption_model_flops

    model = build_caption_model(tokenizer, feature_dim=DV, hidden=32, decoder_layers=2, decoder_heads=2,
                                prefix_len=4, patch_prefix=patch_prefix, mapper_layers=1, mapper_heads=2,
                                max_caption_tokens=8, seed=1)
    torch.manual_seed(5)
    x = torch.randn(1, 56, DV)
    q = ["What color is the triangle?"]
    with FlopCounterMode(display=False) as counter:
        out = model.beam_search(x, q)
    mapper, decoder = caption_model_dims(model)
    analytic = caption_model_flops(mapper, decoder, discarded_tokens=56, prefix_len=model.config.prefix_len,
                                   question_tokens=out.question_tokens[0], beams=3,
                                   caption_tokens=out.steps[0] + 1, feature_dim=DV, patch_prefix=patch_prefix)
    assert out.steps[0] >= 1
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_standardize_input_folds_into_the_linear(tokenizer):
    """W/sigma, b - W mu/sigma: the mapper's Linear on raw features == the original Linear on standardised ones."""
    m = build_caption_model(tokenizer, feature_dim=DV, hidden=32, decoder_layers=1, decoder_heads=2, prefix_len=2,
                            mapper_layers=1, mapper_heads=2, seed=3)
    torch.manual_seed(3)
    feats = torch.randn(8, 56, DV) * 0.5 + torch.randn(DV) * 20  # a large component shared by all patches
    before = m.mapper.linear(feats.sub(feats.mean((0, 1))).div(feats.reshape(-1, DV).std(0) + 1e-5))
    stats = m.mapper.standardize_input(feats)
    assert stats["feature_mean_norm"] > 50
    torch.testing.assert_close(m.mapper.linear(feats), before, atol=1e-3, rtol=1e-3)


def test_detokenize_matches_the_fact_strings():
    from actors.captioner import detokenize

    assert detokenize("the cross in row 8 , column 6 is yellow .") == "the cross in row 8, column 6 is yellow."
    assert detokenize(" there are two triangles .") == "there are two triangles."


def test_attention_supervision_moves_caption_attention_onto_the_named_slot(tokenizer):
    """caption_losses(target_slots=...): the loss is the LVLM's attention_target_loss on the prefix slot of the
    named patch; a few optimiser steps on it raise the supervised heads' attention there (the others untouched)."""
    torch.manual_seed(0)
    model = build_caption_model(tokenizer, feature_dim=DV, hidden=32, decoder_layers=2, decoder_heads=2,
                                prefix_len=2, patch_prefix=True, mapper_layers=1, mapper_heads=2, dropout=0.0,
                                seed=4).train()
    x = torch.randn(4, 10, DV)
    questions = ["What color is the triangle?", "What shape is the red object?", "Is there a red circle?",
                 "How many squares are there?"]
    captions = ["the triangle is red.", "the circle is red.", "there is no red circle.", "there are two squares."]
    slots = [[3], [7], [], [1, 5]]

    def attention_on_target() -> float:
        with torch.no_grad():
            tf = model.teacher_forced(x[:1], questions[:1], captions[:1], output_attentions=True)
        assert tf.first_slot == tf.prompt_len - 10 - 2  # [question ; 10 patch slots ; 2 constants]
        return tf.out.attentions[-1][0, 0, tf.prompt_len - 1:, tf.first_slot + 3].mean().item()

    out = model.caption_losses(x, questions, captions, target_slots=slots, slot_hidden=True)
    assert out["caption_ce"].shape == (4,) and out["attention"].item() > 0
    assert out["slot_hidden"].shape == (4, 10, 32)  # the 10 patch slots entering the last layer
    none = model.caption_losses(x, questions, captions, target_slots=[[], [], [], []])["attention"]
    assert none.item() == 0.0
    before = attention_on_target()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        attn = model.caption_losses(x, questions, captions, target_slots=slots)["attention"]
        opt.zero_grad()
        attn.backward()
        opt.step()
    after = attention_on_target()
    assert after > max(0.5, 3 * before), (before, after)

    clipcap = build_caption_model(tokenizer, feature_dim=DV, hidden=32, decoder_layers=1, decoder_heads=2,
                                  prefix_len=2, mapper_layers=1, mapper_heads=2)
    with pytest.raises(ValueError, match="patch_prefix"):
        clipcap.caption_losses(x, questions, captions, target_slots=slots)


def test_shipped_folder_keeps_todays_behaviour():
    """models/shapes/captioner's JSON predates the new keys: it reads feature-layer features, with the project's
    mapper and search (sum rank, EOS stops, detokenized captions)."""
    m = CaptionModel.from_pretrained("models/shapes/captioner")
    c = m.config
    assert (c.input_features, c.mapper_arch, c.beam_rank, c.stop_on_eos, c.decode) == (
        "feature_layer", "encoder", "sum", True, "detokenize")
    assert m.tokenizer.eos_token_id in m.stop_ids
    from actors.captioner import CaptionConfig

    with pytest.raises(ValueError, match="input_features"):
        CaptionConfig(feature_dim=4, hidden=8, input_features="last_layer")


def _clipcap(tokenizer, **kw):
    args = dict(feature_dim=DV, hidden=32, decoder_layers=2, decoder_heads=2, prefix_len=4, mapper_layers=2,
                mapper_heads=4, mapper_arch="clipcap", beam_rank="mean", stop_on_eos=False, decode="raw",
                max_caption_tokens=8, seed=1, n_positions=128)
    return build_caption_model(tokenizer, **{**args, **kw})


def test_clipcap_mapper_has_the_authors_parameter_names(tokenizer):
    """mapper_arch='clipcap': clipcap_model.py's TransformerMapper tree (prefix rename from clip_project.*),
    no bias on to_queries / to_keys_values, last P outputs; a shallower copy keeps the first layers."""
    from actors.captioner import shallower_mapper

    m = _clipcap(tokenizer)
    keys = set(m.mapper.state_dict())
    assert {"linear.weight", "linear.bias", "prefix_const", "transformer.layers.1.norm1.weight",
            "transformer.layers.1.attn.to_queries.weight", "transformer.layers.1.attn.to_keys_values.weight",
            "transformer.layers.1.attn.project.bias", "transformer.layers.1.norm2.bias",
            "transformer.layers.1.mlp.fc1.weight", "transformer.layers.1.mlp.fc2.bias"} <= keys
    assert not any(k.endswith(("to_queries.bias", "to_keys_values.bias")) for k in keys)
    assert m.mapper(torch.randn(2, 9, DV)).shape == (2, 4, 32)
    assert m.decoder.config.n_positions == 128
    shallower_mapper(m, 1)
    assert len(m.mapper.transformer.layers) == 1 and m.config.mapper_layers == 1
    with pytest.raises(ValueError, match="patch_prefix"):
        _clipcap(tokenizer, patch_prefix=True)


def test_reference_search_options(tokenizer):
    """beam_rank='mean', stop_on_eos=False, decode='raw': EOS is no stop, captions are the raw decode of their
    ids, the batched search equals the per-item one, and it differs from the project's default search."""
    m = _clipcap(tokenizer)
    assert tokenizer.eos_token_id not in m.stop_ids and m.stop_ids == [tokenizer.convert_tokens_to_ids(".")]
    torch.manual_seed(3)
    x = torch.randn(3, 20, DV)
    out = m.beam_search(x, QUESTIONS)
    for caps, ids in zip(out.captions, out.token_ids, strict=True):
        assert caps == [tokenizer.decode(i) for i in ids]
        assert len({tuple(i) for i in ids}) == 3
    for i, q in enumerate(QUESTIONS):
        single = m.beam_search(x[i : i + 1], [q])
        assert single.token_ids[0] == out.token_ids[i]
        assert single.scores[0] == pytest.approx(out.scores[i], abs=1e-4)
    assert out.scores == [sorted(s, reverse=True) for s in out.scores]


def test_clipcap_captioner_flops_match_flop_counter(tokenizer):
    """The clipcap mapper fits pipeline.flops.caption_model_flops (matmuls only) with a KV-cached search."""
    from torch.utils.flop_counter import FlopCounterMode

    from actors.accm import caption_model_dims
    from pipeline.flops import caption_model_flops

    m = _clipcap(tokenizer)
    torch.manual_seed(5)
    x = torch.randn(1, 40, DV)
    with FlopCounterMode(display=False) as counter:
        out = m.beam_search(x, QUESTIONS[:1], beams=2)
    mapper, decoder = caption_model_dims(m)
    analytic = caption_model_flops(mapper, decoder, discarded_tokens=40, prefix_len=4,
                                   question_tokens=out.question_tokens[0], beams=2, caption_tokens=out.steps[0] + 1,
                                   feature_dim=DV)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)
