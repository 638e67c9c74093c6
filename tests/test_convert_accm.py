"""jobs/convert_accm_checkpoint.py: the ACCM authors' released files load into the product and compute what the
authors' code computes (random weights at the real shapes, tests/realshape.py).

The references below are written in plain torch on the raw state dicts, after the authors' code (ASGO-MM/ACCM
@ 50f1bd8): ClipCap's TransformerMapper (clipcap_model.py), GPT-2 small, ``generate_beam`` (decoding_scheme.py
lines 72-131, uncached and per item), LongCLIP's ``encode_text`` (model_longclip.py lines 356-372) and the
TransformerSelector (selector_transformer.py). They import nothing from the product.

Beam search is capped at MAX_NEW new tokens in both (the product's ``max_tokens``, the reference's
``entry_length``): the converted folder keeps the authors' 67, but an uncached reference over 67 steps of
GPT-2 small costs minutes on 2 cores, and 6 steps already cover the first-step top-k, the running mean-rank
and (with the '.'-prone decoder below) beams that finish, continue with a zero-cost token and keep their length.
"""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tests import realshape  # noqa: E402

MAX_NEW = 6
DISCARDED = 576 - 72  # LLaVA-1.5 at 87.5% pruning
SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS = ["What is the man holding?", "Is there a dog in the picture near the red bus?"]


# ------------------------------------------------------------------------------------------ references


def ref_mapper(sd: dict, x: torch.Tensor, layers: int = 4, heads: int = 8) -> torch.Tensor:
    """ClipCap TransformerMapper.forward (clipcap_model.py lines 151-155, 70-85, 95-98)."""
    p = "clip_project."
    x = x @ sd[p + "linear.weight"].T + sd[p + "linear.bias"]
    const = sd[p + "prefix_const"]
    m = x.shape[1]
    x = torch.cat([x, const.unsqueeze(0).expand(x.shape[0], *const.shape)], dim=1)
    for i in range(layers):
        q = f"{p}transformer.layers.{i}."
        h = F.layer_norm(x, (x.shape[-1],), sd[q + "norm1.weight"], sd[q + "norm1.bias"], 1e-5)
        b, n, c = h.shape
        queries = (h @ sd[q + "attn.to_queries.weight"].T).reshape(b, n, heads, c // heads)
        kv = (h @ sd[q + "attn.to_keys_values.weight"].T).reshape(b, n, 2, heads, c // heads)
        keys, values = kv[:, :, 0], kv[:, :, 1]
        att = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * (c // heads) ** -0.5
        att = att.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, values).reshape(b, n, c)
        x = x + out @ sd[q + "attn.project.weight"].T + sd[q + "attn.project.bias"]
        h = F.layer_norm(x, (c,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], 1e-5)
        h = F.relu(h @ sd[q + "mlp.fc1.weight"].T + sd[q + "mlp.fc1.bias"])
        x = x + h @ sd[q + "mlp.fc2.weight"].T + sd[q + "mlp.fc2.bias"]
    return x[:, m:]


def ref_gpt2_logits(sd: dict, embeds: torch.Tensor, layers: int = 12, heads: int = 12) -> torch.Tensor:
    """GPT-2 (``gpt.*`` of the checkpoint) over inputs_embeds [B, T, d], positions 0..T-1: last-position logits."""
    g = "gpt.transformer."
    b, t, d = embeds.shape
    x = embeds + sd[g + "wpe.weight"][:t]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(layers):
        p = f"{g}h.{i}."
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]  # Conv1D: x @ W + b
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=-1))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // heads)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")  # gelu_new
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x[:, -1], (d,), sd[g + "ln_f.weight"], sd[g + "ln_f.bias"], 1e-5)
    return x @ sd["gpt.lm_head.weight"].T


def ref_generate_beam(sd: dict, tokenizer, embed: torch.Tensor, beam_size: int = 3, entry_length: int = MAX_NEW,
                      stop_token: str = ".") -> tuple[list[str], list[float]]:
    """decoding_scheme.py generate_beam (lines 72-131), uncached; returns (texts, scores), best first."""
    stop_index = tokenizer.encode(stop_token)[0]
    tokens, scores = None, None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    wte = sd["gpt.transformer.wte.weight"]
    generated = embed
    for _ in range(entry_length):
        logits = ref_gpt2_logits(sd, generated).softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[source]
        generated = torch.cat((generated, wte[next_tokens.squeeze(1)].view(beam_size, 1, -1)), dim=1)
        is_stopped = is_stopped + next_tokens.eq(stop_index).squeeze(1)
        if is_stopped.all():
            break
    final = scores / seq_lengths
    texts = [tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(tokens, seq_lengths, strict=True)]
    order = final.argsort(descending=True).tolist()
    return [texts[i] for i in order], [float(final[i]) for i in order]


def ref_longclip_ids(tokenizer, texts: list[str], context: int = 248) -> torch.Tensor:
    """longclip.tokenize(texts, truncate=True) (longclip.py lines 333-353) over the same BPE."""
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = torch.zeros(len(texts), context, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot] + tokenizer.encode(text, add_special_tokens=False) + [eot]
        if len(ids) > context:
            ids = ids[:context]
            ids[-1] = eot
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def ref_longclip_encode(sd: dict, ids: torch.Tensor, layers: int = 12, heads: int = 12) -> torch.Tensor:
    """model_longclip.py encode_text (lines 356-372) with the causal mask of build_attention_mask (lines 337-343).

    Pooling at the first EOT (argmax in LongCLIP, where EOT 49407 is the highest id; this test's small BPE puts
    its EOS last too)."""
    n_ctx = ids.shape[1]
    mask1 = torch.zeros(n_ctx, 1)
    mask1[:20] = 1
    mask2 = torch.zeros(n_ctx, 1)
    mask2[20:] = 1
    x = sd["token_embedding.weight"][ids]
    x = x + sd["positional_embedding"] * mask1 + sd["positional_embedding_res"] * mask2
    d = x.shape[-1]
    attn_mask = torch.full((n_ctx, n_ctx), float("-inf")).triu(1)
    b = x.shape[0]
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(d, dim=-1)
        q, k, v = (z.view(b, n_ctx, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // heads) + attn_mask).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, n_ctx, d)
        x = x + y @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (d,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(b), ids.argmax(dim=-1)] @ sd["text_projection"]


def ref_selector(sd: dict, feats: torch.Tensor, layers: int = 4, heads: int = 8) -> torch.Tensor:
    """TransformerSelector.forward (selector_transformer.py lines 48-68) for one item: [N, d] -> softmax [N]."""
    x = feats
    n, d = x.shape
    for i in range(layers):
        p = f"transformer_encoder.layers.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
        q, k, v = (h @ sd[p + "self_attn.in_proj_weight"].T + sd[p + "self_attn.in_proj_bias"]).split(d, dim=-1)
        q, k, v = (z.view(n, heads, d // heads).transpose(0, 1) for z in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // heads)).softmax(-1)
        y = (att @ v).transpose(0, 1).reshape(n, d)
        x = x + y @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"])
        x = x + h @ sd[p + "linear2.weight"].T + sd[p + "linear2.bias"]
    return (x @ sd["head.weight"].T + sd["head.bias"]).squeeze(-1).softmax(-1)


def ref_selector_text(question: str, caption: str) -> str:
    """clip_encoder.py lines 296-307 for one question."""
    prefix = "Question: " + question.strip() + "  Supplemental information for questions: "
    prefix = prefix.replace("\nAnswer with the option's letter from the given choices directly.", "")
    prefix = prefix.replace("\nAnswer the question using a single word or phrase.", "")
    return prefix + caption


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    """Random GPT-2 attention leaves denormal probabilities; on CPU each matmul over them is ~10x slower (a
    6-step search took 40 s instead of 4). Flushed to zero in product and reference alike; default restored."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    # light: the gpt2 folder without weights and the CLIP folder with its tokenizer only -- all the converter
    # reads from them (the whole-job test uses the full folders)
    return realshape.realshape_parts(tmp_path_factory, light=True)


@pytest.fixture(scope="module")
def states(parts):
    return {k: torch.load(parts[k], map_location="cpu", weights_only=True) for k in ("caption", "selector", "longclip")}


def _argv(parts, out, **files) -> list[str]:
    f = {k: str(parts[k]) for k in ("caption", "selector", "longclip")} | {k: str(v) for k, v in files.items()}
    return ["--caption-ckpt", f["caption"], "--selector-ckpt", f["selector"], "--longclip", f"file://{f['longclip']}",
            "--gpt2", str(parts["gpt2"]), "--clip", str(parts["clip"]), "--output", str(out)]


@pytest.fixture(scope="module")
def accm(parts, tmp_path_factory):
    from actors.accm import ACCMCaptioner
    from jobs.convert_accm_checkpoint import main

    out = tmp_path_factory.mktemp("converted") / "accm"
    assert main(_argv(parts, out)) == 0
    return ACCMCaptioner.from_pretrained(str(out / "captioner"), f"file://{out / 'selector'}")


# ------------------------------------------------------------------------------------------ tests


def test_converted_folders_carry_the_reference_settings(accm):
    cfg, scfg = accm.captioner.config, accm.selector.config
    assert (cfg.mapper_arch, cfg.input_features, cfg.beam_rank, cfg.stop_on_eos, cfg.decode) == (
        "clipcap", "projected", "mean", False, "raw")
    assert (cfg.beams, cfg.max_caption_tokens, cfg.prefix_len, cfg.stop_texts) == (3, 67, 20, ["."])
    assert accm.input_features == "projected" and accm.beams == 3
    assert accm.captioner.tokenizer.clean_up_tokenization_spaces  # decode as under transformers 4.37
    assert scfg.arch == "torch_transformer" and scfg.max_text_tokens == 248
    te = accm.selector.text_encoder.config
    assert (te.max_position_embeddings, te.hidden_act, te.num_hidden_layers, te.projection_dim) == (
        248, "quick_gelu", 12, 768)
    assert accm.selector.tokenizer.model_max_length == 248


def test_mapper_prefix_matches_clipcap(accm, states):
    torch.manual_seed(0)
    x = torch.randn(2, DISCARDED, 768)
    with torch.no_grad():
        got = accm.captioner.mapper(x)
    torch.testing.assert_close(got, ref_mapper(states["caption"], x), atol=1e-4, rtol=1e-4)


def _prone_to_stop(sd: dict, tokenizer, seed: int = 7) -> dict:
    """The same GPT-2 with '.' often near the top: ln_f.bias = v, wte['.'] = 6 v (|v| = 1), so beams finish."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(768, generator=gen)
    v = v / v.norm()
    dot = tokenizer.encode(".")[0]
    out = dict(sd)
    wte = sd["gpt.transformer.wte.weight"].clone()
    wte[dot] = 6.0 * v
    out["gpt.transformer.wte.weight"] = out["gpt.lm_head.weight"] = wte
    out["gpt.transformer.ln_f.bias"] = v.clone()
    return out


@pytest.mark.parametrize("prone", [False, True], ids=["as-released", "dot-prone"])
def test_beam_search_matches_generate_beam(accm, states, prone):
    """Batched + KV-cached product search == per-item uncached generate_beam: texts (raw, '.' kept) and scores."""
    cap = accm.captioner
    sd = states["caption"]
    if prone:
        sd = _prone_to_stop(sd, cap.tokenizer)
        original = {k: v.clone() for k, v in cap.decoder.state_dict().items()
                    if k in ("transformer.wte.weight", "transformer.ln_f.bias")}
        with torch.no_grad():
            cap.decoder.transformer.wte.weight.copy_(sd["gpt.transformer.wte.weight"])
            cap.decoder.transformer.ln_f.bias.copy_(sd["gpt.transformer.ln_f.bias"])
    try:
        torch.manual_seed(1)
        x = torch.randn(2, DISCARDED, 768)
        questions = [q + SUFFIX for q in QUESTIONS]
        out = cap.beam_search(x, questions, max_tokens=MAX_NEW)
    finally:
        if prone:
            with torch.no_grad():
                cap.decoder.transformer.wte.weight.copy_(original["transformer.wte.weight"])
                cap.decoder.transformer.ln_f.bias.copy_(original["transformer.ln_f.bias"])
    stopped = 0
    with torch.no_grad():
        prefix = ref_mapper(sd, x)
        for i, q in enumerate(questions):
            q_ids = torch.tensor(cap.tokenizer.encode(q))  # gpt_tokenizer.encode(q): no BOS
            embed = torch.cat([sd["gpt.transformer.wte.weight"][q_ids][None], prefix[i : i + 1]], dim=1)
            texts, scores = ref_generate_beam(sd, cap.tokenizer, embed)
            assert out.captions[i] == texts
            assert out.scores[i] == pytest.approx(scores, abs=1e-4)
            stopped += sum(t.endswith(".") and len(ids) < MAX_NEW for t, ids in zip(texts, out.token_ids[i],
                                                                                   strict=True))
    if prone:
        assert stopped > 0, "the dot-prone decoder should finish some beams early"


def test_selector_matches_longclip_and_transformer_selector(accm, states):
    sel = accm.selector
    question = "What is the man holding?" + SUFFIX
    long_caption = " ".join(["a man is riding a horse on the beach"] * 40) + "."
    candidates = [" a man is holding an umbrella.", "He is holding a red ball", long_caption]
    texts = [ref_selector_text(question, c) for c in candidates]
    assert [sel.text(question, c) for c in candidates] == texts
    ids = ref_longclip_ids(sel.tokenizer, texts)
    with torch.no_grad():
        ref_feats = ref_longclip_encode(states["longclip"], ids)
        ref_probs = ref_selector(states["selector"], ref_feats)
    with pytest.warns(UserWarning, match="truncated to 248"):
        feats, _ = sel.encode_texts(texts)
    torch.testing.assert_close(feats, ref_feats, atol=2e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="truncated"):
        picks, probs = sel.select([question], [candidates])
    torch.testing.assert_close(probs[0], ref_probs, atol=1e-5, rtol=1e-4)
    assert picks == [int(ref_probs.argmax())]


def test_caption_end_to_end_and_flops_match_the_counter(accm):
    """ACCMCaptioner.caption honours ``beams``; one item's analytic captioner / selector FLOPs equal a
    FlopCounterMode count of the reference parts (KV-cached beam search; the selector with PyTorch's fused
    encoder-layer fast path off and the math SDPA kernel, so that every matmul is visible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(2)
    x = torch.randn(1, DISCARDED, 768)
    q = [QUESTIONS[0] + SUFFIX]
    cfg = accm.captioner.config
    reference_max, cfg.max_caption_tokens = cfg.max_caption_tokens, MAX_NEW  # 67 steps: see the module doc
    try:
        res = accm.caption(x, q, beams=2)
    finally:
        cfg.max_caption_tokens = reference_max
    assert len(res.candidates[0]) == 2 and res.selected[0] in res.candidates[0]
    assert sum(res.probs[0]) == pytest.approx(1.0, abs=1e-5)

    cap = accm.captioner
    with FlopCounterMode(display=False) as counter:
        out = cap.beam_search(x, q, max_tokens=MAX_NEW)
    analytic = accm.captioner_flops(DISCARDED, out.question_tokens[0], out.steps[0] + 1)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)

    cands = out.captions[0]
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            accm.selector(q, [cands])
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    analytic = accm.selector_flops(len(cands), accm.selector_tokens(q[0], cands))
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_bad_checkpoints_are_named_and_nothing_is_written(parts, states, tmp_path):
    """Missing, unexpected and mis-shaped keys, in all three files at once: every one named, no folder written."""
    from jobs.convert_accm_checkpoint import main

    cap = dict(states["caption"])
    cap["clip_project.extra_scale"] = torch.ones(1)
    sel = {k: v for k, v in states["selector"].items() if k != "transformer_encoder.layers.3.linear2.bias"}
    lc = dict(states["longclip"])
    lc["positional_embedding_res"] = lc["positional_embedding_res"][:77]
    files = {"caption": tmp_path / "cap.pt", "selector": tmp_path / "sel.pt", "longclip": tmp_path / "lc.pt"}
    for key, state in (("caption", cap), ("selector", sel), ("longclip", lc)):
        torch.save(state, files[key])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main(_argv(parts, out, **files))
    msg = str(err.value)
    assert "clip_project.extra_scale" in msg and "unexpected" in msg
    assert "transformer_encoder.layers.3.linear2.bias" in msg and "missing" in msg
    assert "positional_embedding_res (77, 768) (expected (248, 768))" in msg
    assert "nothing written" in msg
    assert not out.exists() and not any(p.name.startswith(".out-convert-") for p in tmp_path.iterdir())

    with pytest.raises(SystemExit, match="gpt.transformer.h.11.mlp.c_fc.weight"):  # the decoder part is checked too
        bad = dict(states["caption"])
        bad["gpt.transformer.h.11.mlp.c_fc.weight"] = bad["gpt.transformer.h.11.mlp.c_fc.weight"][:, :100]
        torch.save(bad, tmp_path / "cap2.pt")
        main(_argv(parts, out, caption=tmp_path / "cap2.pt"))
    assert not out.exists()


def test_help_works(capsys):
    from jobs.convert_accm_checkpoint import main

    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    assert "--caption-ckpt" in capsys.readouterr().out
