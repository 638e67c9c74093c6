"""Every method once at the real LLaVA-1.5-7B widths (random weights, layers cut), on CPU.

CLIP ViT-L/14-336 (1024 hidden, 4096 FFN, 16 heads, 336 px / 14 = 576 patches; 2 layers so the
penultimate exists) and LLaMA-7B (4096 hidden, 11008 FFN, 32 heads, vocab 32064; 2 layers so that
FastV at layer 1 has a pruned layer after it). Shapes and token counts, not accuracy.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors.dart import dart_kept_count  # noqa: E402
from actors.engine import METHODS, LlavaEngine, resolve_keep_tokens  # noqa: E402
from actors.pruners import visionzip_split  # noqa: E402
from actors.tiny import build_processor, build_tokenizer, fast_random_llava  # noqa: E402
from tests import realshape  # noqa: E402

QUESTION = "What shape is in row 1, column 2?"


@pytest.fixture(scope="module")
def engine() -> LlavaEngine:
    tok = build_tokenizer()
    model = fast_random_llava(realshape.llava_7b_config(tok, vision_layers=2), dtype=torch.bfloat16)
    return LlavaEngine(model, build_processor(tok, image_size=336, patch=14))


@pytest.fixture(scope="module")
def vision(engine: LlavaEngine):
    pixels = torch.randn(1, 3, 336, 336)
    return engine.encode_images(pixels)


def test_vision_stage_shapes(engine: LlavaEngine, vision):
    assert engine.num_patches == 576
    assert vision.patch_features.shape == (1, 576, 1024)
    assert vision.cls_attention.shape == (1, 576) and vision.keys.shape == (1, 576, 64)  # head-mean keys
    assert vision.patch_features.dtype == torch.bfloat16
    assert torch.isfinite(vision.patch_features.float()).all()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_at_87_5_percent(engine: LlavaEngine, vision, method: str):
    keep = resolve_keep_tokens(576, prune_rate=0.875)
    assert keep == 72
    pruned = engine.prune(vision, method, keep, ["item-0"], [QUESTION])
    in_llm = 576 if method in ("none", "fastv", "dart") else 72  # the in-LLM pruners get every patch
    assert pruned.retained.shape == (1, in_llm, 1024)
    if method == "visionzip":
        dominant, contextual = visionzip_split(72)
        assert (dominant, contextual) == (61, 11)
        assert pruned.kept_indices.shape == (1, 60) and pruned.discarded.shape == (1, 516, 1024)
    else:
        assert pruned.kept_indices.shape[1] + pruned.discarded.shape[1] == 576
    engine.keep_last_state = True
    try:
        result = engine.generate(
            pruned.retained, [QUESTION], ["the square is red."] if method == "accm" else None,
            method=method, keep_tokens=keep, fastv_layer=1, dart_layer=1, max_new_tokens=2,
        )  # fmt: skip
        state = engine.last_state
    finally:
        engine.keep_last_state, engine.last_state = False, None
    n = result.prefill_tokens[0]
    text = n - in_llm
    assert 10 <= text <= 40
    steps = result.new_tokens[0] - 1
    lengths = [k.shape[2] for k in state.keys]
    assert state.keys[0].shape[:2] == (1, 32) and state.keys[0].shape[-1] == 128
    if method == "fastv":
        assert lengths == [n + steps, n - 576 + 72 + steps]
    elif method == "dart":  # its code's count: 4 image pivots + 8 x (72 // 8)
        assert lengths == [n + steps, n - 576 + dart_kept_count(576, 72) + steps] and dart_kept_count(576, 72) == 76
    else:
        assert lengths == [n + steps, n + steps]
    flops = result.flops[0]
    assert flops["total"] > flops["llm_prefill"] > 0
    if method == "none":
        assert flops["total"] == flops["reference_total"]
    elif method in ("fastv", "dart"):  # one of the two layers runs before the cut
        assert flops["total"] < 0.65 * flops["reference_total"]
    elif method in ("cdpruner", "divprune"):  # they project all 576 patches to compare them: heavy at 2 layers
        assert flops["pruner"] > 2 * 576 * 4096 * 4096 and flops["total"] < 0.25 * flops["reference_total"]
    elif method != "accm":
        assert flops["total"] < 0.2 * flops["reference_total"]
