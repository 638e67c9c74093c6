"""The analytic FLOPs model against torch's FlopCounterMode on real (small, random-weight) HF models."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.models.clip.modeling_clip import CLIPEncoder  # noqa: E402

from pipeline import flops, flops_cli  # noqa: E402
from tests.flopcount import FlopCounterMode  # noqa: E402

# The contract is 2%; both sides count exactly the same matmuls, so they agree to rounding and a tight
# tolerance also catches off-by-one KV lengths (one cached position is ~0.2% of a small decode step).
TOL = 1e-3


def measured(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def assert_close(analytic: float, counted: float, tol: float = TOL) -> None:
    assert counted > 0
    assert abs(analytic - counted) / counted < tol, (analytic, counted, analytic / counted)


def small_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        attn_implementation="eager",
    )


def small_clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        projection_dim=48,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module", autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- against FlopCounterMode


def test_llama_prefill_and_cached_decode_step():
    config = small_llama_config()
    model = LlamaForCausalLM(config).eval()
    dims = flops.dims_from_config(config)
    assert (dims.kv_heads, dims.gated_ffn, dims.vocab) == (2, True, 300)
    n = 40
    ids = torch.randint(0, 300, (1, n))

    # A plain forward computes the LM head on every position.
    assert_close(flops.prefill_flops(dims, n, lm_head_positions=n), measured(lambda: model(ids)))
    # generate's prefill computes it on the last position only.
    assert_close(flops.prefill_flops(dims, n), measured(lambda: model(ids, logits_to_keep=1)))

    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    nxt = torch.randint(0, 300, (1, 1))
    counted = measured(lambda: model(nxt, past_key_values=cache, use_cache=True))
    assert_close(flops.decode_step_flops(dims, n), counted)


def test_llama_generate_counts_prefill_plus_new_tokens_minus_one_steps():
    config = small_llama_config()
    model = LlamaForCausalLM(config).eval()
    dims = flops.dims_from_config(config)
    n, new = 24, 5
    ids = torch.randint(3, 300, (1, n))
    counted = measured(
        lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    )
    assert_close(flops.prefill_flops(dims, n) + flops.decode_flops(dims, n, new), counted)


def test_clip_vision_tower():
    config = small_clip_vision_config()
    model = CLIPVisionModel(config).eval()
    pixels = torch.randn(1, 3, 64, 64)
    assert_close(flops.vision_tower_flops(config), measured(lambda: model(pixels)))
    # A tower cut at LLaVA's feature layer (-2) runs one layer fewer.
    model.encoder.layers = model.encoder.layers[:-1]
    assert_close(flops.vision_tower_flops(config, layers=2), measured(lambda: model(pixels)))


def test_clip_text_with_projection_and_selector_classifier():
    config = CLIPTextConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=80,
        projection_dim=48,
        attn_implementation="eager",
    )
    text = CLIPTextModelWithProjection(config).eval()
    dims = flops.dims_from_config(config)
    assert (dims.gated_ffn, dims.vocab) == (False, 0)
    candidates, tokens = 3, 30
    ids = torch.randint(0, 200, (candidates, tokens))
    counted_text = measured(lambda: text(ids))
    assert_close(
        candidates * (flops.encoder_flops(dims, tokens) + 2 * 64 * 48),
        counted_text,
    )

    # The selector's classifier: a pre-norm bidirectional stack over the candidate vectors + Linear(d -> 1).
    cls_config = CLIPTextConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation="eager",
    )
    encoder, head = CLIPEncoder(cls_config).eval(), torch.nn.Linear(48, 1)
    vectors = torch.randn(1, candidates, 48)
    counted_cls = measured(lambda: head(encoder(inputs_embeds=vectors).last_hidden_state))
    analytic = flops.selector_flops(
        dims,
        flops.dims_from_config(cls_config),
        candidates=candidates,
        tokens_per_candidate=tokens,
        projection_dim=48,
    )
    assert_close(analytic, counted_text + counted_cls)
    one = dict(tokens_per_candidate=tokens, projection_dim=48)
    assert flops.selector_flops(dims, flops.dims_from_config(cls_config), candidates=1, **one) == 0.0  # not run
    assert flops.selector_flops(dims, flops.dims_from_config(cls_config), candidates=2, **one) > 0


def test_gpt2_prefill_and_beam_search_caption_decoder():
    config = GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    dims = flops.dims_from_config(config)
    n = 32
    ids = torch.randint(0, 500, (1, n))
    assert_close(flops.prefill_flops(dims, n, lm_head_positions=n), measured(lambda: model(ids)))

    # HF beam search expands the inputs to the beams before the prefill (prefill_copies = beams);
    # every later step runs the beams through one cached decode step each.
    beams, caption = 3, 6
    counted = measured(
        lambda: model.generate(
            ids,
            num_beams=beams,
            num_return_sequences=beams,
            max_new_tokens=caption,
            min_new_tokens=caption,
            do_sample=False,
            pad_token_id=0,
        )
    )
    no_mapper = flops.TransformerDims(64, 128, 0, 4, 4, False)
    analytic = flops.caption_model_flops(
        no_mapper,
        dims,
        discarded_tokens=0,
        prefix_len=0,
        question_tokens=n,
        beams=beams,
        caption_tokens=caption,
        prefill_copies=beams,
    )
    assert_close(analytic, counted)


def test_caption_mapper_counts_linear_and_stack():
    """The mapper = Linear(Dv -> d) per discarded patch + a bidirectional stack over [patches ; prefix]."""
    cfg = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg._attn_implementation = "eager"
    linear, stack = torch.nn.Linear(40, 64), CLIPEncoder(cfg).eval()
    discarded, prefix = torch.randn(1, 50, 40), torch.randn(1, 10, 64)
    counted = measured(lambda: stack(inputs_embeds=torch.cat([linear(discarded), prefix], 1)))
    mapper_dims = flops.dims_from_config(cfg)
    decoder_none = flops.TransformerDims(64, 128, 0, 4, 4, False)
    analytic = flops.caption_model_flops(
        mapper_dims,
        decoder_none,
        discarded_tokens=50,
        prefix_len=10,
        question_tokens=0,
        beams=3,
        caption_tokens=1,
        feature_dim=40,
    )
    assert_close(analytic, counted)


def small_llava() -> tuple[LlavaConfig, LlavaForConditionalGeneration]:
    config = LlavaConfig(
        vision_config=small_clip_vision_config(),
        text_config=small_llama_config(),
        image_token_index=299,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "eager"
    return config, LlavaForConditionalGeneration(config).eval()


def test_full_llava_forward_counts_every_vision_layer():
    config, model = small_llava()
    visual = (64 // 8) ** 2
    text_before, text_after = 5, 17
    ids = torch.cat(
        [
            torch.randint(0, 290, (1, text_before)),
            torch.full((1, visual), 299),
            torch.randint(0, 290, (1, text_after)),
        ],
        dim=1,
    )
    pixels = torch.randn(1, 3, 64, 64)
    counted = measured(lambda: model(input_ids=ids, pixel_values=pixels))
    item = flops.llava_item_flops(
        config,
        method="none",
        visual_tokens_total=visual,
        visual_tokens_kept=visual,
        prompt_tokens=text_before + text_after,
        new_tokens=1,
        lm_head_positions=ids.shape[1],
    )
    assert item["llm_decode"] == 0 and item["pruner"] == 0 and item["captioner"] == 0
    assert item["total"] == pytest.approx(item["reference_total"])
    assert_close(item["total"], counted)
    # The last CLIP layer runs although LLaVA reads layer -2: one layer fewer would be off by far > 2%.
    one_layer = flops.layer_flops(flops.dims_from_config(config.vision_config), visual + 1, visual + 1)
    assert one_layer / counted > 0.04


# --------------------------------------------------------------------------- the model's own logic


def test_decode_steps_use_growing_kv_length():
    dims = flops.TransformerDims(64, 128, 2, 4, 4, True, vocab=100)
    assert flops.decode_flops(dims, 10, 1) == 0.0
    assert flops.decode_flops(dims, 10, 3) == flops.decode_step_flops(dims, 10) + flops.decode_step_flops(
        dims, 11
    )
    # The attention part grows by 4*H*h per extra cached position per layer.
    diff = flops.decode_step_flops(dims, 11) - flops.decode_step_flops(dims, 10)
    assert diff == dims.layers * 2 * 2 * 64


def test_fastv_sees_all_tokens_before_layer_k_only():
    config = flops_cli.named_llava_config("llava-1.5-7b")
    kw = dict(visual_tokens_total=576, visual_tokens_kept=144, prompt_tokens=60, new_tokens=4)
    before = flops.llava_item_flops(config, method="prumerge_plus", **kw)
    fastv0 = flops.llava_item_flops(config, method="fastv", fastv_layer=0, **kw)
    fastv2 = flops.llava_item_flops(config, method="fastv", fastv_layer=2, **kw)
    none = flops.llava_item_flops(config, method="none", **kw)
    assert fastv0["llm_prefill"] == pytest.approx(before["llm_prefill"])
    assert before["llm_prefill"] < fastv2["llm_prefill"] < none["llm_prefill"]
    assert fastv2["projector"] == none["projector"] > before["projector"]
    assert fastv2["llm_decode"] > fastv0["llm_decode"]
    for item in (before, fastv0, fastv2, none):
        assert item["reference_total"] == pytest.approx(none["total"])
        assert item["total"] == pytest.approx(sum(item[k] for k in flops.COMPONENTS))


def test_llava_7b_published_shape():
    config = flops_cli.named_llava_config("llava-1.5-7b")
    text = flops.dims_from_config(config.text_config)
    # Per token the linear layers cost 2 x parameters: 6.48 B non-embedding params in LLaMA-7B.
    linear = text.layers * (flops.layer_flops(text, 1, 0))
    assert linear / 2 == pytest.approx(32 * (4 * 4096**2 + 3 * 4096 * 11008))
    assert flops.vision_tower_flops(config.vision_config) == pytest.approx(0.382e12, rel=0.01)


def test_fastv_convention_matches_paper_reductions():
    config = flops_cli.named_llava_config("llava-1.5-7b")
    for rate, paper in ((0.5, 0.45), (0.75, 0.67), (0.9, 0.80)):
        keep = flops_cli.resolve_keep(576, None, rate)
        item = flops_cli.cli_item(
            config, method="fastv", keep=keep, prompt_tokens=32, new_tokens=1, convention="fastv"
        )
        assert item["reduction"] == pytest.approx(paper, abs=0.01), (rate, item["reduction"])


def test_cli_json_every_method(capsys):
    for method in flops.METHODS:
        assert (
            flops_cli.main(
                ["--model", "llava-1.5-7b", "--method", method, "--prune-rate", "0.875"]
                + ["--prompt-tokens", "64", "--new-tokens", "4", "--json"]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        for key in ("vision", "projector", "llm_prefill", "llm_decode", "total"):
            assert out[key] >= 0
        assert out["visual_tokens_kept"] == (576 if method == "none" else 72)
        assert (out["captioner"] > 0 and out["selector"] > 0) == (method == "accm")
        assert (out["total"] < out["reference_total"]) == (method != "none")
    assert (
        flops_cli.main(
            ["--model", "llava-1.5-13b", "--method", "fastv", "--keep-tokens", "288", "--prompt-tokens", "32"]
            + ["--new-tokens", "1", "--convention", "fastv", "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["reduction"] == pytest.approx(0.45, abs=0.02)


def test_table_rows_and_accm_cost():
    rows = flops_cli.flops_table(flops_cli.named_llava_config("llava-1.5-7b"))
    by = {(r["method"], r["kept"]): r for r in rows}
    assert by[("none", 576)]["percent_of_unpruned"] == pytest.approx(100.0)
    for keep in flops_cli.TABLE_KEEPS:
        # ACCM = its base pruner + caption model + selector + the caption's tokens in the LLM.
        assert by[("accm", keep)]["flops"] > by[("prumerge_plus", keep)]["flops"]
        assert by[("accm", keep)]["captioner"] > 0 and by[("accm", keep)]["selector"] > 0
    assert by[("accm", 72)]["percent_of_unpruned"] < 40.0


def test_selector_counts_candidates_at_real_length_by_default():
    """The selector tokenizes with padding to the longest candidate, so the estimate counts real length;
    248 (LongCLIP padded, as in the paper's code) stays available and costs more."""
    config = flops_cli.named_llava_config("llava-1.5-7b")
    real = flops_cli.cli_item(config, method="accm", keep=72, prompt_tokens=64, new_tokens=4, caption_tokens=36)
    padded = flops_cli.cli_item(
        config, method="accm", keep=72, prompt_tokens=64, new_tokens=4, caption_tokens=36, selector_tokens=248
    )
    assert flops.selector_real_tokens(64, 36) == 64 + 36 + flops.SELECTOR_TEMPLATE_TOKENS
    assert flops.selector_real_tokens(200, 100) == flops.LONGCLIP_MAX_TOKENS
    assert 2.0 < padded["selector"] / real["selector"] < 2.6
    assert real["total"] < padded["total"]
    assert real["llm_prefill"] == padded["llm_prefill"]


def test_fastv_convention_counts_the_caption_splice():
    """ACCM's caption is LLM text under either convention: by default its 36-token budget plus the splice."""
    config = flops_cli.named_llava_config("llava-1.5-7b")
    kw = dict(keep=72, prompt_tokens=32, new_tokens=1, convention="fastv")
    base = flops_cli.cli_item(config, method="prumerge_plus", **kw)
    accm = flops_cli.cli_item(config, method="accm", **kw)
    text = config.text_config
    extra = flops.DEFAULT_CAPTION_TOKENS + flops.CAPTION_SPLICE_TOKENS
    n = 32 + 72 + extra
    assert accm["total"] == pytest.approx(
        flops.fastv_convention_flops(
            text.hidden_size, text.intermediate_size, text.num_hidden_layers, n, n, 0
        )
    )
    assert accm["total"] > base["total"]
    assert flops_cli.cli_item(config, method="accm", caption_tokens=0, **kw)["total"] == base["total"]


SHAPES = "models/shapes"


def test_cli_prices_shipped_accm_folders_like_the_pipeline(capsys):
    """--captioner/--selector price the shipped folders from their configs alone, and agree with the loaded
    ACCMCaptioner the pipeline prices items with; a checkpoint dir gets no CLIP-L text guide it lacks."""
    from actors.accm import ACCMCaptioner

    config = flops_cli.load_llava_config(f"{SHAPES}/lvlm")
    total = flops.visual_tokens(config)
    keep, q, cap = 8, 9, 6
    argv = [
        "--model",
        f"{SHAPES}/lvlm",
        "--method",
        "accm",
        "--keep-tokens",
        str(keep),
        "--prompt-tokens",
        "20",
    ]
    argv += ["--new-tokens", "2", "--question-tokens", str(q), "--caption-tokens", str(cap), "--json"]
    assert flops_cli.main(argv + ["--captioner", f"{SHAPES}/captioner", "--selector", f"{SHAPES}/selector"]) == 0
    item = json.loads(capsys.readouterr().out)
    accm = ACCMCaptioner.from_pretrained(f"{SHAPES}/captioner", f"{SHAPES}/selector")
    assert item["captioner"] == pytest.approx(accm.captioner_flops(total - keep, q, cap))
    assert item["selector"] == pytest.approx(
        accm.selector_flops(accm.captioner.config.beams, flops.selector_real_tokens(q, cap))
    )
    # the single-head CLS score only (k_proj on all tokens, q_proj of CLS, one row): no text tower here
    c, t = config.vision_config.hidden_size, total + 1
    assert item["pruner"] == pytest.approx(2 * t * c * c + 2 * c * c + 2 * t * c)
    # the tower as the job's engine runs it: up to the feature layer (-2)
    assert item["vision"] == pytest.approx(
        flops.vision_tower_flops(config.vision_config, layers=config.vision_config.num_hidden_layers - 1)
    )
    # without the folders: the reference GPT-2 + LongCLIP-L parts, far dearer than the shipped ones
    assert flops_cli.main(argv) == 0
    reference = json.loads(capsys.readouterr().out)
    assert reference["captioner"] > 100 * item["captioner"]
    with pytest.raises(SystemExit):
        flops_cli.main(argv + ["--captioner", f"{SHAPES}/captioner"])


def test_table_scales_keeps_and_unit_to_the_model(capsys):
    config = flops_cli.load_llava_config(f"{SHAPES}/lvlm")
    rows = flops_cli.flops_table(config, prompt_tokens=20, new_tokens=2)
    total = flops.visual_tokens(config)
    kept = {r["kept"] for r in rows if r["method"] == "prumerge_plus"}
    assert kept == {max(1, round(k * total / 576)) for k in flops_cli.TABLE_KEEPS}
    assert (
        flops_cli.main(["--model", f"{SHAPES}/lvlm", "--table", "--prompt-tokens", "20", "--new-tokens", "2"])
        == 0
    )
    title = capsys.readouterr().out.splitlines()[0]
    assert f"{total} visual tokens" in title and "MFLOPs" in title


def test_table_prints_accm_floor(capsys):
    """The floor line = prumerge_plus + the caption's LLM tokens; it explains issue 6's 7B target: with a 36-token
    caption at 72 kept tokens and the default 64-token prompt, the caption's LLM tokens alone put ACCM above 30%."""
    assert flops_cli.main(["--model", "llava-1.5-7b", "--table"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("kept   72:"))
    floor = float(line.rsplit(":", 1)[1].strip(" %)"))
    rows = flops_cli.flops_table(flops_cli.named_llava_config("llava-1.5-7b"))
    by = {(r["method"], r["kept"]): r for r in rows}
    accm, base = by[("accm", 72)], by[("prumerge_plus", 72)]
    assert base["percent_of_unpruned"] < floor < accm["percent_of_unpruned"]
    caption_llm = accm["llm_prefill"] + accm["llm_decode"] - base["llm_prefill"] - base["llm_decode"]
    ref = 100.0 * accm["flops"] / accm["percent_of_unpruned"]
    assert floor == pytest.approx(base["percent_of_unpruned"] + 100.0 * caption_llm / ref, abs=0.05)


# --------------------------------------------------------------------------- PruMerge+'s score, the CLI's layers


def test_single_head_cls_score_against_flop_counter():
    """cls_score_flops == FlopCounterMode on the vision stage's partial next layer (actors.vision)."""
    from actors.vision import next_layer_cls_score, single_head_cls_score

    config, model = small_llava()
    tower = model.model.vision_tower
    layer = tower.encoder.layers[2]
    hidden = torch.randn(2, 65, 64)
    counted = measured(lambda: next_layer_cls_score(layer, hidden)) / 2  # per image
    assert_close(flops.cls_score_flops(config), counted)
    q, k = torch.randn(1, 1, 64), torch.randn(1, 65, 64)
    assert_close(flops.cls_score_flops(config, projected=True), measured(lambda: single_head_cls_score(q, k)))
    # feature layer = the last one: its own q/k, only the score row is the pruner's
    config.vision_feature_layer = -1
    assert flops.cls_score_flops(config) == flops.cls_score_flops(config, projected=True) == 2 * 65 * 64


def test_cli_counts_the_layers_the_job_runs():
    config = flops_cli.named_llava_config("llava-1.5-7b")
    assert flops.vision_layers_run(config) == 23 and flops.vision_layers_run(config, projected=True) == 24
    kw = dict(keep=72, prompt_tokens=64, new_tokens=4)
    none = flops_cli.cli_item(config, method="none", **kw)
    assert none["vision"] == pytest.approx(flops.vision_tower_flops(config.vision_config, layers=23))
    # a text guide (CLIP-L's text tower, the named models' default) needs the last layer's projected patches
    plus = flops_cli.cli_item(config, method="prumerge_plus", **kw)
    assert plus["vision"] == pytest.approx(flops.vision_tower_flops(config.vision_config, layers=24))
    bare = flops_cli.cli_item(config, method="prumerge_plus", text_guide_dims=None, **kw)
    assert bare["vision"] == none["vision"]
    assert bare["pruner"] == pytest.approx(flops.cls_score_flops(config))
    # ~1.2 GFLOPs: k_proj over 577 tokens at width 1024 dominates
    assert flops.cls_score_flops(config) == pytest.approx(
        2 * 577 * 1024 * 1024 + 2 * 1024**2 + 2 * 577 * 1024
    )
