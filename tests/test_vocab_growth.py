"""jobs/grow_vocabulary.py: folders saved before the v2 world's cell words keep every trained row, behave the
same on old words, and read each new cell word as one token that starts from the words it replaces."""

from __future__ import annotations

import pytest
import torch

from actors import shapes_clip as C
from actors import shapes_lvlm as L
from actors import shapes_lvlm_v2 as V
from actors import vocab_growth as G
from jobs import grow_vocabulary as J
from pipeline import shapes_v2 as world

N_NEW = 1 + len(world.CELL_WORDS)  # "cell" and the 36 cell words
OLD_QUESTION = "How many red objects are there?"


def test_appended_words_needs_a_prefix():
    assert G.appended_words({"a": 0, "b": 1}, {"a": 0, "b": 1, "c": 2}) == ["c"]
    with pytest.raises(ValueError, match="not a prefix"):
        G.appended_words({"a": 0, "b": 1}, {"b": 0, "a": 1, "c": 2})


def test_cell_words_name_every_cell_once():
    assert len(set(world.CELL_WORDS)) == world.CELLS**2
    assert world.cell_of("c4") == (3, 2) and world.cell_of("g1") is None and world.cell_of("red") is None
    assert world.cell_word_parts("c4") == ("4", "3", "three")
    assert world.vocabulary_words()[-N_NEW:] == ["cell", *world.CELL_WORDS]


def test_grown_lvlm_keeps_old_behaviour_and_reads_cell_words(tmp_path):
    old_tok = L.build_tokenizer(V.vocabulary()[:-N_NEW])
    model = V.build_model("tiny", tokenizer=old_tok, seed=3).eval()
    model.save_pretrained(tmp_path)
    V.build_processor(old_tok).save_pretrained(tmp_path)
    ids = old_tok(OLD_QUESTION, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    assert J.main([str(tmp_path)])[0] == {"folder": str(tmp_path), "kind": "llava", "new_words": N_NEW,
                                          "vocab": len(V.vocabulary())}
    assert J.grow(tmp_path)["new_words"] == 0  # a grown folder is left as it is

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    grown = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tok = AutoProcessor.from_pretrained(tmp_path).tokenizer
    assert len(tok) == len(V.vocabulary()) == grown.get_input_embeddings().num_embeddings
    assert tok(OLD_QUESTION)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        logits_after = grown(input_ids=ids).logits
    assert torch.allclose(logits_after[..., : len(old_tok)], logits_before, atol=1e-5)
    assert (logits_after[..., len(old_tok):] == 0).all()  # a cell word is never an answer: zero output rows
    c4 = tok("cell c4", add_special_tokens=False)["input_ids"]
    assert len(c4) == 2 and tok.unk_token_id not in c4
    emb = grown.get_input_embeddings().weight
    parts = [old_tok.convert_tokens_to_ids(p) for p in ("4", "3", "three")]
    assert torch.allclose(emb[c4[1]], emb[parts].mean(0))


def test_grown_clip_and_caption_model_keep_old_rows(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, CLIPModel

    from actors.captioner import CaptionModel, build_caption_model

    full = C.vocabulary()
    monkeypatch.setattr(C, "vocabulary", lambda: full[:-N_NEW])
    old_clip_tok = C.build_tokenizer()
    monkeypatch.undo()
    clip = C.build_clip("tiny", tokenizer=old_clip_tok, seed=1).eval()
    clip.save_pretrained(tmp_path / "clip")
    C.build_processor(old_clip_tok).save_pretrained(tmp_path / "clip")
    text = old_clip_tok([OLD_QUESTION], return_tensors="pt")
    with torch.no_grad():
        before = clip.get_text_features(**text)

    old_tok = L.build_tokenizer(V.vocabulary()[:-N_NEW])
    cap = build_caption_model(old_tok, feature_dim=16, hidden=32, decoder_layers=1, decoder_heads=2)
    cap.save_pretrained(tmp_path / "captioner")
    q = torch.tensor([old_tok(OLD_QUESTION)["input_ids"]])
    with torch.no_grad():
        cap_before = cap.decoder(input_ids=q).logits

    rows = J.main([str(tmp_path / "clip"), str(tmp_path / "captioner")])
    assert [(r["kind"], r["new_words"]) for r in rows] == [("clip", N_NEW), ("captioner", N_NEW)]

    grown = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "clip")
    assert len(tok) == len(full) and tok.unk_token_id not in tok("cell f6")["input_ids"]
    with torch.no_grad():
        after = grown.get_text_features(**tok([OLD_QUESTION], return_tensors="pt"))
    assert torch.allclose(_pooled(after), _pooled(before), atol=1e-5)

    grown_cap = CaptionModel.from_pretrained(tmp_path / "captioner")
    assert len(grown_cap.tokenizer) == len(V.vocabulary())
    with torch.no_grad():
        cap_after = grown_cap.decoder(input_ids=q).logits
    assert torch.allclose(cap_after[..., : len(old_tok)], cap_before, atol=1e-5)
    assert grown_cap.decoder.lm_head.weight.data_ptr() == grown_cap.decoder.get_input_embeddings().weight.data_ptr()


def _pooled(features) -> torch.Tensor:
    """get_text_features returns a tensor or, in newer transformers, an output whose pooler_output is it."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output
