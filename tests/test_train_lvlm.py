"""The proving-ground LVLM's pieces: tokenizer/processor/model in the llava-1.5 layout, packed training
sequences equal to the single-turn inference prompt, and the training job's smoke mode."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors import shapes_lvlm as L  # noqa: E402
from actors.prompt import build_prompt  # noqa: E402
from pipeline import shapes  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return L.build_tokenizer()


def test_tokenizer_covers_every_prompt_fact_and_answer(tok):
    unk = tok.unk_token_id
    for i in range(60):
        item = shapes.make_item(7, "train", i)
        fact = shapes.fact(item.objects, item.question_type, item.question, item.target)
        ids = tok(build_prompt(item.question, fact) + " " + item.answer + "</s>")["input_ids"]
        assert unk not in ids, tok.convert_ids_to_tokens(ids)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode([tok.convert_tokens_to_ids("red"), tok.eos_token_id], skip_special_tokens=True) == "red"


def test_packed_branches_equal_native_single_turn_forward(tok):
    proc = L.build_processor(tok)
    model = L.build_model("tiny", tokenizer=tok).eval()
    rng = np.random.default_rng(3)
    objs = shapes.sample_scene(rng, "train")
    img = shapes.render(objs)
    branches = L.draw_branches(objs, rng, n_image=2, n_fact=1, n_text=1)
    pb = L.pack_batch(tok, [branches])
    px = L.pixel_values([np.asarray(img)])
    with torch.no_grad():
        logits, labels = L.packed_logits(model, px, pb)
        # the first labelled position of each branch is its last prompt token
        starts = [0]
        for br in branches[:-1]:
            starts.append(starts[-1] + len(tok(br.answer, add_special_tokens=False)["input_ids"]) + 1)
        for br, s in zip(branches, starts, strict=True):
            text = build_prompt(br.question, br.caption, image_token="<image>" if br.use_image else "")
            inp = proc(images=[img], text=[text], return_tensors="pt") if br.use_image else tok([text], return_tensors="pt")
            if br.use_image:  # the numpy normalisation used in training equals the saved processor's
                torch.testing.assert_close(inp["pixel_values"], px, atol=1e-6, rtol=0)
            ref = model(**inp).logits[0, -1]
            torch.testing.assert_close(logits[s], ref, atol=1e-4, rtol=1e-4)
            assert labels[s].item() == tok.convert_tokens_to_ids(br.answer)


def test_curriculum_scenes_stay_in_train_split():
    rng = np.random.default_rng(0)
    assert L.curriculum_range(0.0, 0.3) == (1, 4) and L.curriculum_range(0.5, 0.3) == (10, 16)
    for _ in range(20):
        objs = L.sample_train_scene(rng, 1, 4)
        assert 1 <= len(objs) <= 4 and shapes.scene_hash(objs) % 10 < 8


def test_smoke_training_saves_a_loadable_llava(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from jobs.train_lvlm import main

    out = tmp_path / "lvlm"
    summary = main(["--smoke", "--output", str(out), "--ckpt", str(tmp_path / "ckpt.pt")])
    assert summary["evals"] and set(summary["evals"][-1]["val"]) >= set(shapes.QUESTION_TYPES)
    # stage 0 reports the tower's held-out per-patch row/column accuracy beside colour and shape
    assert {"patch_color", "object_shape", "patch_row", "patch_col"} <= set(summary["stage0"])
    assert all(0.0 <= summary["stage0"][k] <= 1.0 for k in ("patch_row", "patch_col"))
    assert json.loads((out / "training_log.json").read_text())["parameters"] == summary["parameters"]
    model = AutoModelForImageTextToText.from_pretrained(out, attn_implementation="eager")
    proc = AutoProcessor.from_pretrained(out)
    item = shapes.make_item(0, "test", 0)
    inp = proc(images=[shapes.render(item.objects)], text=[build_prompt(item.question)], return_tensors="pt")
    assert (inp["input_ids"] == model.config.image_token_id).sum() == 64
    gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inp["input_ids"].shape[1]
    # resume from the checkpoint runs no further steps and keeps the weights
    again = main(["--smoke", "--output", str(out), "--ckpt", str(tmp_path / "ckpt.pt"), "--resume"])
    assert again["parameters"] == summary["parameters"]
    # the object-count diagnostic runs through the engine on the saved model
    from jobs.eval_lvlm import main as eval_main

    rows = eval_main(["--model", str(out), "--by-objects", "1,3-4", "--per-type", "2", "--threads", "1"])
    assert [r["objects"] for r in rows] == ["1", "3-4"]
    assert all(0.0 <= r["all"] <= 100.0 and r["mflops"] > 0 for r in rows)


def test_diagnostic_items_have_the_requested_object_counts():
    from jobs.eval_lvlm import _ranges, items_with_objects

    assert _ranges("1,2,10-16") == [(1, 1), (2, 2), (10, 16)]
    items = items_with_objects(7, 3, (2, 3))
    assert len(items) == 3 * len(shapes.QUESTION_TYPES)
    for it in items:
        assert 2 <= len(it.objects) <= 3
        assert shapes.scene_hash(it.objects) % 10 == 9  # test split
        assert it.answer in {a for a in [o.color for o in it.objects] + [o.shape for o in it.objects]} | {
            "yes", "no"} | {str(i) for i in range(4)}
    val = items_with_objects(7, 2, (2, 3), "val")  # eval_lvlm --split val --by-objects
    assert all(shapes.scene_hash(it.objects) % 10 == 8 and 2 <= len(it.objects) <= 3 for it in val)


def test_stage1_question_types_must_include_an_always_askable_type():
    from jobs.train_lvlm import parse_args

    assert parse_args(["--stage1-qtypes", "color,shape,spatial"]).stage1_qtypes == "color,shape,spatial"
    for bad in ("color,shape", "colour,spatial"):  # colour/shape alone can loop forever; unknown type
        with pytest.raises(SystemExit):
            parse_args(["--stage1-qtypes", bad])


def _obj(shape, color, row, col):
    return shapes.SceneObject(shape=shape, color=color, row=row, col=col, dx=0, dy=0, size=5)


def test_word_attention_targets_select_the_named_objects():
    scene = (_obj("triangle", "red", 0, 1), _obj("circle", "red", 2, 3), _obj("triangle", "blue", 2, 5))
    p = shapes.patch_index
    tri, red = [p(scene[0]), p(scene[2])], [p(scene[0]), p(scene[1])]
    t = L._word_attention_targets
    assert t("color", "What color is the circle ?".split(), scene) == ([(4, [p(scene[1])])], [], 4)
    assert t("shape", "What shape is the blue object ?".split(), scene) == ([(4, [p(scene[2])])], [], 4)
    assert t("count", "How many triangles are there ?".split(), scene) == ([(2, tri)], [], 2)
    assert t("count", "How many squares are there ?".split(), scene) == ([(2, [])], [], 2)  # none: the sink only
    # a word's own target is the same in every question; the exist conjunction is a context target
    assert t("exist", "Is there a red triangle ?".split(), scene) == ([(3, red), (4, tri)], [(4, [p(scene[0])])], 4)
    assert t("exist", "Is there a blue circle ?".split(), scene)[1] == [(4, [])]
    assert t("spatial", "What shape is in row 3 , column 6 ?".split(), scene) == (
        [], [(5, [p(scene[1]), p(scene[2])]), (8, [p(scene[2])])], 8)


def test_packed_attention_targets_point_at_the_right_tokens(tok):
    rng = np.random.default_rng(5)
    objs = shapes.sample_scene(rng, "train")
    branches = L.draw_branches(objs, rng, n_image=4, n_fact=2, n_text=1)
    pb = L.pack_batch(tok, [branches])
    toks = tok.convert_ids_to_tokens(pb.input_ids[0].tolist())
    n_prefix = int(pb.image_mask[0].int().argmax())
    # every plain image branch has exactly one hop: from its last prompt token to one naming word
    assert len(pb.hop_targets) == 4
    label_positions = set((pb.labels[0] != -100).nonzero().flatten().tolist())
    for row, query, (word,) in pb.hop_targets:
        assert row == 0 and toks[query] == ":" and query in label_positions and word < query
        assert toks[word] in shapes.COLORS or toks[word].isdigit() or toks[word].rstrip("es") in shapes.SHAPES \
            or toks[word][:-1] in shapes.SHAPES
    for _, query, keys in pb.word_targets + pb.context_targets:
        assert keys[0] == 0  # the <s> sink
        assert all(pb.image_mask[0, k] for k in keys[1:]) and query > max(keys)
        # each key is the visual token of an object the word names
        names = {toks[query], toks[query][:-1], toks[query][:-2]}
        for k in keys[1:]:
            o = next(o for o in objs if n_prefix + shapes.patch_index(o) == k)
            assert names & {o.color, o.shape} or toks[query].isdigit()
    # fact and text-only branches get no targets: their answer is in the text
    assert len({q for _, q, _ in pb.word_targets}) == len(pb.word_targets)


def test_attention_target_loss_is_lowest_on_uniform_target_attention():
    targets = [(0, 3, [0, 1]), (1, 2, [2])]
    uniform = torch.full((2, 2, 4, 4), 0.25)
    on_target = torch.zeros(2, 2, 4, 4)
    on_target[0, :, 3, [0, 1]] = 0.5
    on_target[1, :, 2, 2] = 1.0
    elsewhere = torch.zeros(2, 2, 4, 4)
    elsewhere[:, :, :, 3] = 1.0
    loss = {name: L.attention_target_loss(a, targets, heads=2).item()
            for name, a in (("uniform", uniform), ("on", on_target), ("off", elsewhere))}
    assert loss["on"] < loss["uniform"] < loss["off"]
    assert loss["on"] == pytest.approx((np.log(2) + 0.0) / 2, abs=1e-5)
    # only the first `heads` heads are supervised
    half = on_target.clone()
    half[:, 1] = elsewhere[:, 1]
    assert L.attention_target_loss(half, targets, heads=1).item() == pytest.approx(loss["on"], abs=1e-5)
    assert L.attention_target_loss(uniform, [], heads=2).item() == 0.0


def test_attention_supervision_trains_the_named_heads(tok):
    """A few steps of the auxiliary loss alone move layer 0's first head toward the named objects."""
    model = L.build_model("tiny", tokenizer=tok)
    model.config.text_config._attn_implementation = "eager"
    rng = np.random.default_rng(2)
    scenes = [shapes.sample_scene(rng, "train") for _ in range(4)]
    pb = L.pack_batch(tok, [L.draw_branches(s, rng, n_image=3, n_fact=0, n_text=0) for s in scenes])
    px = L.pixel_values([np.asarray(shapes.render(s)) for s in scenes])
    opt = torch.optim.Adam(model.model.language_model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, _, attn = L.packed_logits(model, px, pb, output_attentions=True)
        loss = L.attention_target_loss(attn[0], pb.word_targets, heads=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_hidden_fact_objects_are_not_in_the_image(tok):
    from jobs.train_lvlm import parse_args, vqa_batch

    args = parse_args(["--smoke", "--hide-fact-objects", "1.0"])
    args.batch, args.n_image, args.n_fact, args.n_text = 3, 2, 2, 1
    rng = np.random.default_rng(11)
    px, pb = vqa_batch(tok, rng, args, (10, 16), stage=2)
    assert px.shape[0] == 3 and pb.input_ids.shape[0] == 3
    # replay the same draws to see the scenes: every fact branch's named objects are missing from the image
    # that the plain branches (and the pixels) show, and the facts still state the full scene's answer
    rng = np.random.default_rng(11)
    checked = 0
    for image in range(3):
        objs = L.sample_train_scene(rng, 10, 16)
        assert rng.random() < 1.0
        facts = L.draw_branches(objs, rng, n_image=0, n_fact=2, n_text=1)
        hidden = {i for br in facts if br.use_image for i in br.target}
        shown = tuple(o for i, o in enumerate(objs) if i not in hidden)
        plain = L.draw_branches(shown, rng, n_image=2, n_fact=0, n_text=0)
        assert all(br.objects == shown for br in plain) and len(shown) < len(objs)
        # the batch's pixels are the scene without the hidden objects
        torch.testing.assert_close(px[image], L.pixel_values([np.asarray(shapes.render(shown))])[0])
        for br in facts:
            assert br.caption and br.objects == objs
            if br.use_image:
                assert not any(objs[i] in shown for i in br.target)
                checked += 1
    assert checked == 6


def test_grown_llm_computes_what_the_trained_one_did_until_fine_tuned(tok):
    """Block expansion: the new front layers start as the identity, the trained layers move up by the same count."""
    from copy import deepcopy

    from transformers import LlavaForConditionalGeneration

    trained = L.build_model("tiny", tokenizer=tok, seed=1).eval()
    with torch.no_grad():  # give every weight a non-trivial value (zero-init output projections would hide a bug)
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = deepcopy(trained.config)
    config.text_config.num_hidden_layers = trained.config.text_config.num_hidden_layers + 2
    grown = LlavaForConditionalGeneration(config).eval()
    assert L.grow_llm_front(trained, grown) == 2
    ids = torch.randint(5, len(tok), (2, 72))
    ids[:, 1:65] = trained.config.image_token_id
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = trained(input_ids=ids, pixel_values=pixels).logits
        got = grown(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grown.model.language_model.layers[2].self_attn.q_proj.weight,
                               trained.model.language_model.layers[0].self_attn.q_proj.weight)
    # the front layers are trainable: their zeroed output projections get a gradient
    grown.train()
    grown(input_ids=ids, pixel_values=pixels).logits.square().mean().backward()
    assert grown.model.language_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot grow"):
        L.grow_llm_front(grown, trained)
