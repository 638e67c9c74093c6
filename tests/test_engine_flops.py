"""The analytic per-item FLOPs (pipeline.flops via the engine) vs. FlopCounterMode on the same work."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.flopcount import FlopCounterMode

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors.engine import METHODS, LlavaEngine  # noqa: E402
from actors.tiny import build_tiny_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.fixture(scope="module")
def engine() -> LlavaEngine:
    # 96-d LLM with 4 layers (FastV at layer 2 leaves two pruned layers), 3-layer tower, 64 patches.
    model, processor = build_tiny_llava(
        vision_layers=3, text_hidden=96, text_layers=4, heads=4, kv_heads=2, seed=5, init_std=0.2
    )
    return LlavaEngine(model, processor)  # fused attention: counted via tests.flopcount


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def measured_and_analytic(engine: LlavaEngine, image, method: str, keep: int, caption: str | None):
    pixels = engine.preprocess([image])  # outside the count: image decoding is not model FLOPs
    with FlopCounterMode(display=False) as counter:
        result, pruned = engine.answer(
            pixels, ["How many squares are there?"], ["item-0"], [caption],
            method=method, keep_tokens=keep, max_new_tokens=7,
        )  # fmt: skip
    return counter.get_total_flops(), result.flops[0], result, pruned


@pytest.mark.parametrize("keep", [8, 24])
@pytest.mark.parametrize("method", METHODS)
def test_analytic_total_within_2_percent(engine: LlavaEngine, image, method: str, keep: int):
    caption = "there are two squares." if method == "accm" else None
    measured, flops, result, _ = measured_and_analytic(engine, image, method, keep, caption)
    assert result.new_tokens[0] >= 2, "need decode steps in the count"
    assert flops["total"] == pytest.approx(measured, rel=0.02), (method, keep, flops)
    if method != "none":
        assert flops["total"] < flops["reference_total"] or method == "accm"
        assert flops["llm_prefill"] < flops["reference_total"] - flops["vision"]


def test_text_guided_prumerge_counted(engine: LlavaEngine, image):
    """PruMerge+ with a CLIP text model: its text tower and projections are part of the item's cost."""
    engine.text_guide = small_text_guide(engine)
    try:
        measured, flops, _, pruned = measured_and_analytic(engine, image, "prumerge_plus", 8, None)
    finally:
        engine.text_guide = None
    assert pruned.notes == []
    assert flops["pruner"] > 1e5
    assert flops["total"] == pytest.approx(measured, rel=0.02)


def small_text_guide(engine: LlavaEngine):
    from transformers import CLIPConfig, CLIPModel

    from actors.pruners import TextGuide

    tok = engine.tokenizer
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=77, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                           image_size=64, patch_size=8),
        projection_dim=32,
    )  # fmt: skip
    clip = CLIPModel(config).eval()
    clip.config._attn_implementation = "eager"
    return TextGuide(clip, tok)


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("method", ["random", "visionzip", "prumerge_plus", "accm", "cdpruner", "divprune"])
def test_front_flops_match_the_vision_stage_and_pruner(
    engine: LlavaEngine, image, method: str, projected: bool
):
    """front_flops (vision + pruner) == FlopCounterMode over encode_images + prune, as the captioner tier runs them:
    the feature layer's layers, the single-head score's partial next layer (or every layer and the projection
    when projected patches are computed), the text tower on the question's real tokens."""
    questions = ["How many squares are there?\nAnswer the question using a single word or phrase."]
    engine.text_guide = small_text_guide(engine) if projected else None
    try:
        pixels = engine.preprocess([image])
        with FlopCounterMode(display=False) as counter:
            vision = engine.encode_images(pixels)
            engine.prune(vision, method, 8, ["item-0"], questions)
        front = engine.front_flops(method, 8, questions, projected=projected)
    finally:
        engine.text_guide = None
    assert set(front[0]) == {"vision", "pruner"}
    total = front[0]["vision"] + front[0]["pruner"]
    assert total == pytest.approx(counter.get_total_flops(), rel=1e-3), (method, projected, front)
    if method in ("prumerge_plus", "accm"):
        assert front[0]["pruner"] > 2 * 65 * 64 * 64  # at least the next layer's k_proj or the text tower


@pytest.mark.parametrize("method", ["none", "random", "divprune", "prumerge_plus"])
def test_clip_is_run_and_priced_only_where_read(engine: LlavaEngine, image, method: str):
    """With a text guide loaded, full tokens and the plain pruners run and cost exactly what they do without one
    (the tower up to the feature layer): the last layer, its projection and the text tower are the text-guided
    pruners' cost alone, so the cost report compares each method as it would run by itself."""
    question = "How many squares are there?"

    def run(guide) -> tuple[float, float]:
        engine.text_guide = guide
        try:
            pixels = engine.preprocess([image])
            with FlopCounterMode(display=False) as counter:
                result, _ = engine.answer(pixels, [question], ["item-0"], [None], method=method,
                                          keep_tokens=None if method == "none" else 16, max_new_tokens=3)
        finally:
            engine.text_guide = None
        return counter.get_total_flops(), result.flops[0]["total"]

    measured_plain, priced_plain = run(None)
    measured_clip, priced_clip = run(small_text_guide(engine))
    assert priced_clip == pytest.approx(measured_clip, rel=0.02)
    if method == "prumerge_plus":
        assert measured_clip > measured_plain and priced_clip > priced_plain
    else:
        assert measured_clip == measured_plain and priced_clip == pytest.approx(priced_plain, rel=1e-9)


def test_captioner_tier_encodes_and_prices_per_setting(engine: LlavaEngine, image):
    """The captioner tier's view of the same rule: ``needs_projection`` per setting (ACCM by its base pruner),
    a one-setting batch encoded without the projection when nothing reads it, and a plain pruner's front cost
    the same whether or not the shared encoding ran it (a sweep with a text-guided setting in it)."""
    from pipeline.config import JobConfig
    from pipeline.stages import encode_rows, needs_projection, prune_and_caption

    arr = np.asarray(image.convert("RGB"))
    rows = [{"id": "item-0", "question": "How many squares are there?", "_image": arr.tobytes(),
             "_image_shape": list(arr.shape)}]
    cfg = JobConfig(method="random", prune_rate=0.75)
    engine.text_guide = small_text_guide(engine)
    try:
        assert [needs_projection(engine, None, m, cfg) for m in ("none", "random", "divprune", "prumerge_plus",
                                                                   "cdpruner", "accm")] == [False] * 3 + [True] * 3
        assert not needs_projection(engine, None, "accm", JobConfig(accm_base="divprune"))
        alone = encode_rows(engine, rows, projected=needs_projection(engine, None, "random", cfg))
        shared = encode_rows(engine, rows, projected=True)
        assert alone.projected is None and shared.projected is not None
        cost = [prune_and_caption(engine, None, v, rows, "random", None, 0.75, cfg)[0] for v in (alone, shared)]
        guided = prune_and_caption(engine, None, shared, rows, "prumerge_plus", None, 0.75, cfg)[0]
    finally:
        engine.text_guide = None
    assert cost[0]["flops_vision"] == cost[1]["flops_vision"] and cost[0]["flops_pruner"] == cost[1]["flops_pruner"]
    assert guided["flops_vision"] > cost[0]["flops_vision"]
