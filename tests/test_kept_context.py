"""The caption model's kept-patch context (actors/kept_context.py, CaptionConfig.kept_context): the mapper
reads the discarded patches, then the kept ones flagged, in training batches and in the captioner tier alike."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

torch = pytest.importorskip("torch")

from actors.captioner import CaptionModel, build_caption_model  # noqa: E402
from actors.kept_context import enable_kept_context, flag_all_discarded, kept_order, with_kept_context  # noqa: E402
from actors.tiny import build_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DV = 24


def test_discarded_come_first_then_the_kept_ones_flagged():
    d, k = torch.randn(2, 5, DV), torch.randn(2, 3, DV)
    x = with_kept_context(d, k)
    assert x.shape == (2, 8, DV + 1)
    assert torch.equal(x[:, :5, :DV], d) and torch.equal(x[:, 5:, :DV], k)
    assert x[:, :5, -1].eq(0).all() and x[:, 5:, -1].eq(1).all()
    assert flag_all_discarded(d)[..., -1].eq(0).all()
    assert kept_order([7, 2, 4], 8) == [7, 2, 4, 0, 1, 3, 5, 6]
    with pytest.raises(ValueError, match="pair up"):
        with_kept_context(d, torch.randn(2, 3, DV + 1))


def test_enabling_starts_from_the_trained_model_and_survives_a_round_trip(tmp_path):
    """The flag's column starts at zero: flagged-as-discarded input gives the old model's captions exactly; a
    kept flag changes the prefix; the option is saved with the model and priced (FLOPs) with its extra column."""
    from torch.utils.flop_counter import FlopCounterMode

    from actors.accm import caption_model_dims, captioner_flops_slot
    from pipeline.flops import caption_model_flops

    old = build_caption_model(build_tokenizer(), feature_dim=DV, hidden=32, decoder_layers=2, decoder_heads=2,
                              prefix_len=4, patch_prefix=True, mapper_layers=1, mapper_heads=2,
                              max_caption_tokens=8, seed=1)
    new = copy.deepcopy(old)
    enable_kept_context(new)
    assert new.config.kept_context and new.mapper.linear.in_features == DV + 1
    torch.manual_seed(3)
    d = torch.randn(2, 9, DV)
    q = ["What color is the triangle?", "How many circles are there?"]
    with torch.no_grad():
        assert torch.allclose(old.mapper(d), new.mapper(flag_all_discarded(d)), atol=1e-6)
        assert old.beam_search(d, q).captions == new.beam_search(flag_all_discarded(d), q).captions
        new.mapper.linear.weight[:, -1] = torch.randn(new.mapper.linear.out_features)  # (a constant, LN removes)
        flagged = with_kept_context(d[:, :6], d[:, 6:])
        assert not torch.allclose(new.mapper(flagged), new.mapper(flag_all_discarded(d)), atol=1e-3)
    new.save_pretrained(tmp_path / "c")
    back = CaptionModel.from_pretrained(tmp_path / "c")
    assert back.config.kept_context
    with torch.no_grad():
        assert torch.allclose(back.mapper(flagged), new.mapper(flagged), atol=1e-6)
    with FlopCounterMode(display=False) as counter:
        out = back.beam_search(flagged[:1], q[:1])
    slot = captioner_flops_slot(back.config, back.decoder.config, discarded_tokens=9,
                                question_tokens=out.question_tokens[0], caption_tokens=out.steps[0] + 1)
    assert slot["feature_dim"] == DV + 1
    mapper_dims, decoder_dims = caption_model_dims(back)  # the reloaded model is priced with the built sizes
    assert (mapper_dims.hidden, mapper_dims.layers, decoder_dims.layers) == (32, 1, 2)
    assert caption_model_flops(**slot) == pytest.approx(counter.get_total_flops(), rel=0.02)


@pytest.fixture(scope="module")
def engine():
    from actors.engine import LlavaEngine

    return LlavaEngine.from_pretrained(f"{REPO}/models/shapes_v2/lvlm", clip_text_url=f"{REPO}/models/shapes_v2/clip")


def test_training_batches_and_the_captioner_tier_build_the_same_input(engine):
    """make_batch (training, ablation) and pipeline.stages.discarded_features (the job) agree; every count
    fact becomes a target, its slots cover each patch of every counted object, kept ones included."""
    from actors import accm_batches as B
    from actors.accm import ACCMCaptioner
    from actors.selector import CaptionSelector
    from pipeline import shapes_v2 as world
    from pipeline.stages import discarded_features

    keep, idx = 18, list(range(10))  # item i asks QUESTION_TYPES[i % 5]: two of each type
    plain = B.make_batch(engine, 0, "val", idx, keep, world=world, features="projected")
    ctx = B.make_batch(engine, 0, "val", idx, keep, world=world, features="projected", kept_context=True)
    n = world.GRID ** 2
    x = ctx["discarded"]
    assert x.shape == (len(idx), n, plain["discarded"].shape[-1] + 1)
    assert torch.equal(x[:, : n - keep, :-1], plain["discarded"]) and x[:, n - keep :, -1].eq(1).all()
    projected = ctx["vision"].projected
    for r, dropped in enumerate(ctx["discarded_indices"]):
        order = kept_order(dropped, n)
        assert torch.allclose(x[r, :, :-1], projected[r, order])
        item = ctx["items"][r]
        if item.question_type == "count":
            assert ctx["fact_visible"][r] and ctx["facts"][r].startswith("there ")
            want = sorted(p for o in item.target for p in world.patch_indices(item.objects[o]))
            assert sorted(order[s] for s in ctx["target_slots"][r]) == want
        else:
            assert ctx["fact_visible"][r] == plain["fact_visible"][r]
    assert ctx["slot_labels"].shape[1] == n

    captioner = CaptionModel.from_pretrained(f"{REPO}/models/shapes_v2/captioner")
    enable_kept_context(captioner)
    accm = ACCMCaptioner(captioner, CaptionSelector.from_pretrained(f"{REPO}/models/shapes_v2/selector"))
    vision = ctx["vision"]
    pruned = engine.prune(vision, "prumerge_plus", keep, ctx["ids"], ctx["questions"])
    assert torch.allclose(discarded_features(accm, pruned, vision), x)
    out = accm.caption(x[:2], ctx["questions"][:2])
    assert out.flops_captioner[0] > accm.captioner_flops(n - keep, 8, 1)  # priced on all n mapper slots


def test_shipped_pair_states_the_count_the_default_abstains_on(engine):
    """models/shapes_v2/captioner_kept_context says how many objects of a colour there are, where the
    discarded-only default abstains (its card: 77-84% vs 2% of val count items at 18 kept tokens)."""
    from actors import accm_batches as B
    from pipeline import shapes_v2 as world

    count = [5 * i + world.QUESTION_TYPES.index("count") for i in range(24)]
    hits = {}
    for name, kept in (("captioner", False), ("captioner_kept_context", True)):
        model = CaptionModel.from_pretrained(f"{REPO}/models/shapes_v2/{name}")
        assert model.config.kept_context is kept
        batch = B.make_batch(engine, 0, "val", count, 18, world=world, features="projected", kept_context=kept)
        with torch.no_grad():
            first = [c[0] for c in model.beam_search(batch["discarded"], batch["questions"]).captions]
        hits[name] = sum(f == fact for f, fact in zip(first, batch["facts"], strict=True)) / len(count)
    assert hits["captioner_kept_context"] >= 0.5 > 0.2 >= hits["captioner"]
