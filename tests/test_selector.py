"""ACCM selector + the captioner-tier glue (ACCMCaptioner): softmax over N, persistence, FLOPs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

torch = pytest.importorskip("torch")

from actors.selector import CaptionSelector, build_selector, selector_text  # noqa: E402

QS = ["What color is the triangle?", "How many circles are there?"]
CANDS = [["the triangle is red.", "the triangle is blue.", "the square is red."],
         ["there are two circles.", "there is one circle.", "there are three circles."]]


@pytest.fixture(scope="module")
def selector():
    return build_selector(text_hidden=32, text_layers=1, text_heads=2, projection_dim=32, layers=1, heads=2)


def test_softmax_over_candidates_and_argmax_pick(selector):
    logits = selector(QS, CANDS)
    assert logits.shape == (2, 3)
    picks, probs = selector.select(QS, CANDS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert picks == probs.argmax(-1).tolist()
    assert not torch.allclose(logits[0], logits[0, :1].expand(3)), "candidates must be told apart"


def test_order_equivariant_and_text_encoder_frozen(selector):
    """No rank embedding (the default): permuting the candidates permutes the logits; the text encoder is frozen."""
    a = selector(QS[:1], CANDS[:1])
    b = selector(QS[:1], [CANDS[0][::-1]])
    torch.testing.assert_close(b, a.flip(-1), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in selector.text_encoder.parameters())
    selector.train()
    assert not selector.text_encoder.training
    selector.eval()


def test_eos_pooling_reads_the_whole_text(selector):
    """CLIP pools at the first EOS: the feature depends on the caption's last word (id 3, not legacy argmax)."""
    assert selector.text_encoder.config.eos_token_id == selector.tokenizer.eos_token_id == 3
    f, _ = selector.encode_texts([selector_text(QS[0], "the triangle is red."),
                                  selector_text(QS[0], "the triangle is blue.")])
    assert not torch.allclose(f[0], f[1])


def test_selector_learns_a_preference(selector):
    """The KL-to-one-hot loss of the ACCM stage moves the pick (classifier only)."""
    import copy

    sel = copy.deepcopy(selector).train()
    opt = torch.optim.AdamW(sel.trainable_parameters(), lr=5e-3)
    target = torch.tensor([2, 1])
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(sel(QS, CANDS), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sel.select(QS, CANDS)[0] == [2, 1]


def test_rank_embedding_learns_the_first_beam_prior_and_round_trips(tmp_path):
    """rank_embedding: zero at init (still order-blind); trained on 'the first beam is best' over candidates
    whose texts carry no signal (shuffled every step), the selector learns to pick rank 0; saved and loaded
    with the classifier weights."""
    sel = build_selector(text_hidden=32, text_layers=1, text_heads=2, projection_dim=32, layers=1, heads=2,
                         rank_embedding=True, seed=2)
    a = sel(QS[:1], CANDS[:1])
    torch.testing.assert_close(sel(QS[:1], [CANDS[0][::-1]]), a.flip(-1), atol=1e-5, rtol=1e-5)
    assert len(sel.trainable_parameters()) == len([*sel.classifier.parameters(), *sel.head.parameters()]) + 1
    sel.train()
    opt = torch.optim.AdamW(sel.trainable_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        cands = [[c[i] for i in torch.randperm(3, generator=gen).tolist()] for c in CANDS]
        loss = torch.nn.functional.cross_entropy(sel(QS, cands), torch.zeros(2, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    sel.eval()
    assert sel.select(QS, CANDS)[0] == [0, 0] and sel.select(QS, [c[::-1] for c in CANDS])[0] == [0, 0]
    sel.save_pretrained(tmp_path / "ranked")
    loaded = CaptionSelector.from_pretrained(tmp_path / "ranked")
    assert loaded.config.rank_embedding
    torch.testing.assert_close(loaded(QS, CANDS), sel(QS, CANDS))
    with pytest.raises(ValueError, match="candidates"):
        sel(QS[:1], [["a."] * (sel.config.max_candidates + 1)])


def test_save_load_round_trip(selector, tmp_path):
    selector.save_pretrained(tmp_path / "sel")
    assert (tmp_path / "sel/text_encoder/config.json").exists()
    loaded = CaptionSelector.from_pretrained(tmp_path / "sel")
    torch.testing.assert_close(loaded(QS, CANDS), selector(QS, CANDS))


def _analytic_and_measured_flops(sel) -> tuple[float, float]:
    """One item through ``sel`` under FlopCounterMode, with the fused paths off (nn.MultiheadAttention's fast
    path and the CPU SDPA kernels are invisible to the counter), and the analytic count of the same item."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from actors.accm import selector_dims
    from pipeline.flops import selector_flops

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            sel(QS[:1], CANDS[:1])
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    _, tokens = sel.encode_texts([sel.text(QS[0], c) for c in CANDS[0]])
    text, classifier = selector_dims(sel)
    analytic = selector_flops(text, classifier, candidates=3, tokens_per_candidate=tokens,
                              projection_dim=sel.text_encoder.config.projection_dim)
    return analytic, counter.get_total_flops()


def test_selector_flops_match_flop_counter(selector):
    analytic, measured = _analytic_and_measured_flops(selector)
    assert analytic == pytest.approx(measured, rel=0.02)


def test_shared_prefix_gives_the_plain_features_at_fewer_flops(selector):
    """share_prefix: each item's common token prefix (here the template's start and the question) runs once and
    the candidates' suffixes attend to its cached keys/values: same EOS features and logits; FlopCounterMode
    agrees with pipeline.flops.selector_flops(shared_prefix_tokens=...), which is below the plain count."""
    from torch.utils.flop_counter import FlopCounterMode

    from actors.accm import selector_dims
    from pipeline.flops import selector_flops

    texts = [selector.text(q, c) for q, cands in zip(QS, CANDS, strict=True) for c in cands]
    plain, width = selector.encode_texts(texts)
    shared, prefixes, suffix = selector.encode_shared(texts, 3)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    q_ids = selector.tokenizer(QS[0])["input_ids"]
    assert prefixes[0] >= len(q_ids) - 1 and suffix < width  # the question (and the template's start) is shared
    selector.config.share_prefix = True
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            logits_shared = selector(QS[:1], CANDS[:1])
        _, p1, s1 = selector.encode_shared(texts[:3], 3)
    finally:
        selector.config.share_prefix = False
    torch.testing.assert_close(logits_shared, selector(QS[:1], CANDS[:1]), atol=1e-5, rtol=1e-5)
    text, classifier = selector_dims(selector)
    proj = selector.text_encoder.config.projection_dim
    analytic = selector_flops(text, classifier, candidates=3, tokens_per_candidate=s1, projection_dim=proj,
                              shared_prefix_tokens=p1[0])
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)
    _, full_tokens = selector.encode_texts(texts[:3])
    assert analytic < selector_flops(text, classifier, candidates=3, tokens_per_candidate=full_tokens,
                                     projection_dim=proj)


def test_common_prefix_leaves_every_row_its_last_token():
    from actors.shared_prefix import common_prefix

    assert common_prefix([[1, 2, 3, 9], [1, 2, 4, 9], [1, 2, 3, 5, 9]]) == 2
    assert common_prefix([[1, 2, 9], [1, 2, 9]]) == 2  # identical rows: the EOS stays a suffix
    assert common_prefix([[1, 9], [1, 2, 9]]) == 1


def test_accm_captioner_end_to_end(selector, tmp_path):
    """ACCMCaptioner.from_pretrained(file:// urls).caption(discarded, questions) -> CaptionResult."""
    from actors.accm import ACCMCaptioner
    from actors.captioner import build_caption_model
    from actors.tiny import build_tokenizer

    cap = build_caption_model(build_tokenizer(), feature_dim=16, hidden=32, decoder_layers=1, decoder_heads=2,
                              prefix_len=2, mapper_layers=1, mapper_heads=2, max_caption_tokens=5)
    cap.save_pretrained(tmp_path / "cap")
    selector.save_pretrained(tmp_path / "sel")
    accm = ACCMCaptioner.from_pretrained(f"file://{tmp_path / 'cap'}", str(tmp_path / "sel"))
    res = accm.caption(torch.randn(2, 56, 16), QS)
    assert len(res.selected) == len(res.candidates) == len(res.probs) == 2
    for sel_cap, cands, probs in zip(res.selected, res.candidates, res.probs, strict=True):
        assert len(cands) == 3 and sel_cap == cands[max(range(3), key=probs.__getitem__)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert all(f > 0 for f in res.flops_captioner + res.flops_selector)
    accm.selector.config.share_prefix = True  # the same picks, priced at the shared-prefix forward's FLOPs
    torch.manual_seed(0)
    again = accm.caption(discarded := torch.randn(2, 56, 16), QS)
    accm.selector.config.share_prefix = False
    plain = accm.caption(discarded, QS)
    assert again.selected == plain.selected and again.candidates == plain.candidates
    assert all(a < b for a, b in zip(again.flops_selector, plain.flops_selector, strict=True))


def test_shipped_selector_folder_unchanged():
    sel = CaptionSelector.from_pretrained("models/shapes/selector")
    c = sel.config
    assert (c.arch, c.max_text_tokens, c.template, c.strip_caption, c.remove_suffixes) == (
        "encoder", 64, "Question: {q} Supplemental information for questions: {c}", True, [])
    assert sel.text(" What? ", " the cat. ") == "Question: What? Supplemental information for questions: the cat."


def _reference_selector(**kw):
    from actors.selector import LLAVA_ANSWER_SUFFIXES, REFERENCE_TEMPLATE

    args = dict(text_hidden=32, text_layers=1, text_heads=2, projection_dim=32, layers=2, heads=4,
                intermediate=48, arch="torch_transformer", template=REFERENCE_TEMPLATE, strip_caption=False,
                remove_suffixes=LLAVA_ANSWER_SUFFIXES, max_positions=40, seed=3)
    return build_selector(**{**args, **kw})


def test_torch_transformer_selector_is_the_authors_encoder(tmp_path):
    """arch='torch_transformer': classifier.* = TransformerSelector's transformer_encoder.* (prefix rename); its
    logits equal a stock nn.TransformerEncoder (sequence-first) + head loaded with those weights; round trips."""
    sel = _reference_selector()
    state = sel.classifier.state_dict()
    assert "layers.1.self_attn.in_proj_weight" in state and "layers.0.linear2.weight" in state
    assert not any(k.startswith("norm.") for k in state)  # no final norm
    layer = torch.nn.TransformerEncoderLayer(32, 4, 48, 0.1, activation="gelu", norm_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ref.load_state_dict(state)
    texts = [sel.text(QS[0], c) for c in CANDS[0]]
    feats, _ = sel.encode_texts(texts)
    with torch.no_grad():
        want = sel.head(ref(feats[:, None])).squeeze(-1).T  # [1, N]
        got = sel(QS[:1], CANDS[:1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sel.save_pretrained(tmp_path / "ref")
    torch.testing.assert_close(CaptionSelector.from_pretrained(tmp_path / "ref")(QS, CANDS), sel(QS, CANDS))


def test_reference_template_and_token_budget():
    """Two spaces, suffix removed, caption as is; the budget defaults to the encoder's positions and a longer
    text is cut there with a warning (never silently); a budget above the positions is refused."""
    from actors.selector import SelectorConfig

    sel = _reference_selector()
    q = "What color is it?\nAnswer the question using a single word or phrase."
    assert sel.text(q, " red.") == "Question: What color is it?  Supplemental information for questions:  red."
    assert sel.config.max_text_tokens == 40
    long = " ".join(["red"] * 60)
    with pytest.warns(UserWarning, match="truncated to 40"):
        _, tokens = sel.encode_texts([sel.text(q, long)])
    assert tokens == 40
    with pytest.raises(ValueError, match="exceeds"):
        CaptionSelector(SelectorConfig(hidden=32, max_text_tokens=41, arch="torch_transformer"),
                        sel.text_encoder, sel.tokenizer)


def test_torch_transformer_selector_flops_match_flop_counter():
    """The authors' classifier fits pipeline.flops.selector_flops. nn.MultiheadAttention takes PyTorch's fused
    encoder-layer fast path in eval/no-grad and CPU SDPA kernels the counter cannot see: the count runs with the
    fast path off and the math SDPA backend, where every matmul is an aten mm/bmm."""
    analytic, measured = _analytic_and_measured_flops(_reference_selector())
    assert analytic == pytest.approx(measured, rel=0.02)


def test_accm_captioner_honours_beams_and_names_its_features(selector, tmp_path):
    from actors.accm import ACCMCaptioner
    from actors.captioner import build_caption_model
    from actors.tiny import build_tokenizer

    cap = build_caption_model(build_tokenizer(), feature_dim=16, hidden=32, decoder_layers=1, decoder_heads=2,
                              prefix_len=2, mapper_layers=1, mapper_heads=2, max_caption_tokens=5)
    accm = ACCMCaptioner(cap, selector)
    assert accm.input_features == "feature_layer" and accm.beams == 3
    res = accm.caption(torch.randn(2, 20, 16), QS, beams=2)
    assert all(len(c) == 2 and len(p) == 2 for c, p in zip(res.candidates, res.probs, strict=True))
    assert accm.captioner_flops(20, 6, 4, beams=2) < accm.captioner_flops(20, 6, 4) < accm.captioner_flops(20, 6, 4,
                                                                                                       beams=4)
    with pytest.raises(ValueError, match="beams"):
        accm.caption(torch.randn(1, 20, 16), QS[:1], beams=0)


def test_one_candidate_is_greedy_and_skips_the_selector(selector):
    """--num-candidates 1: the caption is the greedy decode (beam search's best of one) and nothing is selected,
    so the selector neither runs nor is priced; with two candidates it runs and costs."""
    from actors.accm import ACCMCaptioner
    from actors.captioner import build_caption_model
    from actors.tiny import build_tokenizer

    torch.manual_seed(0)
    cap = build_caption_model(build_tokenizer(), feature_dim=16, hidden=32, decoder_layers=1, decoder_heads=2,
                              prefix_len=2, mapper_layers=1, mapper_heads=2, max_caption_tokens=5)
    accm = ACCMCaptioner(cap, selector)
    x = torch.randn(2, 20, 16)
    calls = []
    hook = selector.register_forward_hook(lambda *a: calls.append(1))
    try:
        one = accm.caption(x, QS, beams=1)
        assert calls == [] and one.flops_selector == [0.0, 0.0] and one.probs == [[1.0], [1.0]]
        assert [len(c) for c in one.candidates] == [1, 1] and one.selected == [c[0] for c in one.candidates]
        assert one.selected == [c[0] for c in cap.beam_search(x, QS, beams=1).captions]
        two = accm.caption(x, QS, beams=2)
        assert calls and all(f > 0 for f in two.flops_selector)
    finally:
        hook.remove()
