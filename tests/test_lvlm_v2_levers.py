"""Proving ground v2's LVLM training levers (``jobs/train_lvlm_v2.py``'s flags) and the attention machinery they
train through: token drops and shuffles, the question mix, the attention targets and their weights, the
grounding heads, the gather losses and the shape phase; the captured attention rows (equal to eager's maps) and
the lookup diagnostic.

Each checks what its lever changes in a packed batch, a target or a gradient, on tiny real LVLMs (the
transformers classes of the shipped one) where a model is needed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors import shapes_clip as C  # noqa: E402
from actors import shapes_lvlm_v2 as V  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402


def test_token_drop_augmentation_packs_only_the_kept_tokens_and_keeps_labels_true():
    """--drop-visual: an image keeps a random subset of its 144 tokens in their order; the packed row holds
    only those, its branches start right after them, the attention targets point at the kept slots of the
    named objects, and one patch of every object a plain image question is about is always kept."""
    from types import SimpleNamespace

    from actors import shapes_lvlm as L
    from jobs.train_lvlm_v2 import visual_keep

    tok = V.build_tokenizer()
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, "train") for _ in range(6)]
    branches = [V.draw_branches(objs, rng, n_image=4, n_fact=1, n_text=1) for objs in scenes]
    args = SimpleNamespace(drop_visual=1.0, drop_max=0.9375)
    keep = visual_keep(branches, np.random.default_rng(1), args)
    assert visual_keep(branches, np.random.default_rng(1), SimpleNamespace(drop_visual=0.0, drop_max=0.9)) is None
    assert len({len(k) for k in keep}) > 1 and all(k == sorted(set(k)) for k in keep)
    for k, image_branches in zip(keep, branches, strict=True):
        for br in image_branches:
            if br.use_image and br.caption is None:
                assert all(set(world.patch_indices(br.objects[o])) & set(k) for o in br.target)
    full, dropped = V.pack_batch(tok, branches), V.pack_batch(tok, branches, visual_keep=keep)
    assert dropped.image_mask.sum(1).tolist() == [len(k) for k in keep]
    assert full.image_mask.sum(1).tolist() == [V.N_VISUAL] * len(keep)
    prefix = int(full.image_mask[0].nonzero()[0])
    for row, k in enumerate(keep):
        first_text = prefix + len(k)
        # the first branch token sits right after the kept visual tokens, at that position id
        assert int(dropped.position_ids[row, first_text]) == first_text
    by_row = {}
    for (row, _query, keys), (row_f, _, keys_f) in zip(dropped.word_targets, full.word_targets, strict=True):
        assert row == row_f and keys[0] == 0  # the <s> sink, then the kept slots of the same patches
        slot_of = {patch: prefix + i for i, patch in enumerate(keep[row])}
        assert keys[1:] == [slot_of[p - prefix] for p in keys_f[1:] if p - prefix in slot_of]
        by_row[row] = by_row.get(row, 0) + 1
    assert by_row
    # the packed sequence takes the kept rows of the tower features, image after image
    model = V.build_model("tiny", tokenizer=tok)
    px = C.pixel_values([V.render(objs, world.sample_background(rng)) for objs in scenes])
    hidden, _ = L.vision_features(model, px)
    feats = L.kept_features(hidden[:, 1:], keep)
    assert feats.shape == (1, sum(map(len, keep)), hidden.shape[-1])
    assert torch.equal(feats[0, : len(keep[0])], hidden[0, 1:][keep[0]])
    logits, labels = L.packed_logits(model, px, dropped, features=feats)
    assert torch.isfinite(logits).all() and len(labels) == int((dropped.labels != -100).sum())


def test_token_order_augmentation_permutes_kept_tokens_and_targets_follow_them():
    """--shuffle-visual: an image's kept tokens enter in a random order (the same set), the packed features are
    those patches' rows in that order, and each attention target points at the slots where its patches went."""
    from types import SimpleNamespace

    from actors import shapes_lvlm as L
    from jobs.train_lvlm_v2 import shuffled_order, visual_keep

    tok = V.build_tokenizer()
    rng = np.random.default_rng(2)
    scenes = [world.sample_scene(rng, "train") for _ in range(4)]
    branches = [V.draw_branches(objs, rng, n_image=4, n_fact=0, n_text=0) for objs in scenes]
    args = SimpleNamespace(drop_visual=0.5, drop_max=0.9375, shuffle_visual=1.0)
    kept = visual_keep(branches, np.random.default_rng(3), args)
    order = shuffled_order(kept, len(scenes), np.random.default_rng(4), args)
    assert [sorted(o) for o in order] == [sorted(k) for k in kept] and order != kept
    full = shuffled_order(None, 2, np.random.default_rng(4), args)
    assert [sorted(o) for o in full] == [list(range(V.N_VISUAL))] * 2 and full[0] != list(range(V.N_VISUAL))
    assert shuffled_order(kept, len(scenes), np.random.default_rng(4), SimpleNamespace(shuffle_visual=0.0)) is kept
    pb = V.pack_batch(tok, branches, visual_keep=order)
    sorted_pb = V.pack_batch(tok, branches, visual_keep=[sorted(o) for o in order])
    prefix = int(pb.image_mask[0].nonzero()[0])
    n_targets = 0
    for (row, _, keys), (_, _, keys_sorted) in zip(pb.context_targets, sorted_pb.context_targets, strict=True):
        patches = {order[row][k - prefix] for k in keys[1:]}
        assert patches == {sorted(order[row])[k - prefix] for k in keys_sorted[1:]}
        n_targets += len(patches)
    assert n_targets > 0
    model = V.build_model("tiny", tokenizer=tok)
    hidden, _ = L.vision_features(model, C.pixel_values([V.render(o, world.sample_background(rng)) for o in scenes]))
    feats = L.kept_features(hidden[:, 1:], order)
    assert torch.equal(feats[0, : len(order[0])], hidden[0, 1:][order[0]])


def test_count_list_facts_list_hidden_objects_and_count_what_the_image_shows_plus_the_list():
    """--count-list: a listed count fact names some counted objects, one caption each; the image hides them (and
    whatever other fact branches hide), and the answer is the counted objects still shown plus those listed."""
    from jobs.train_lvlm_v2 import count_list_facts, recount

    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(20):
        objs = world.sample_scene(rng, "train", (20, 28))
        facts = V.draw_branches(objs, rng, n_image=0, n_fact=3, n_text=1, qtypes=("count", "color"))
        listed, positions = count_list_facts(objs, facts, rng, share=1.0)
        hidden = {i for br in listed if br.use_image for i in br.target}
        answered = [recount(b, objs, hidden) if j in positions else b for j, b in enumerate(listed)]
        for before, br in zip(facts, answered, strict=True):
            if br.qtype != "count" or not br.use_image or not before.target:
                assert br == before  # colour facts, text-only count facts and counts of zero are untouched
                continue
            colour = br.question.split("How many ", 1)[1].split(" ", 1)[0]
            assert set(br.target) <= set(before.target) and br.target  # 1..all of the counted objects
            assert br.caption == " ".join(world.caption(objs[i]) for i in br.target)
            shown = [o for i, o in enumerate(objs) if i not in hidden and o.color == colour]
            assert int(br.answer) == len(shown) + len(br.target) <= int(before.answer)
            checked += 1
    assert checked > 10


def test_question_weights_shift_only_the_plain_image_questions_mix():
    """--question-weights: the plain image questions' types follow the weights (count=3 -> about 3/7 of them),
    the fact and text-only branches stay uniform, and without weights every branch's types are uniform."""
    from jobs.train_lvlm_v2 import image_question_weights

    assert image_question_weights("") is None
    weights = image_question_weights("count=3")
    assert weights == tuple(3.0 if q == "count" else 1.0 for q in world.QUESTION_TYPES)
    assert image_question_weights("count=3, shape=1") == weights  # spaces around a part are allowed
    with pytest.raises(ValueError):
        image_question_weights("colour=2")  # not a question type
    scene = world.sample_scene(np.random.default_rng(0), "train", (20, 28))

    def count_shares(image_weights) -> tuple[float, float]:
        rng = np.random.default_rng(1)
        kinds: dict[str, list[str]] = {"image": [], "other": []}
        for _ in range(300):
            for br in V.draw_branches(scene, rng, n_image=6, n_fact=2, n_text=1, image_weights=image_weights):
                kinds["image" if br.use_image and br.caption is None else "other"].append(br.qtype)
        return tuple(k.count("count") / len(k) for k in kinds.values())

    image_share, other_share = count_shares(weights)
    assert abs(image_share - 3 / 7) < 0.03 and abs(other_share - 1 / 5) < 0.04
    image_share, other_share = count_shares(None)
    assert abs(image_share - 1 / 5) < 0.03 and abs(other_share - 1 / 5) < 0.04


def test_cell_weight_scales_only_the_cell_words_context_targets():
    """--cell-weight: the context targets whose query follows the word "cell" (the named cell) weigh more;
    the weighted loss equals the plain one at weight 1 and grows with the weight."""
    from actors import shapes_lvlm as L
    from jobs.train_lvlm_v2 import cell_weights

    tok = V.build_tokenizer()
    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng, "train") for _ in range(3)]
    pb = V.pack_batch(tok, [V.draw_branches(s, rng, n_image=6, n_fact=0, n_text=0, qtypes=("color", "exist"))
                            for s in scenes])
    cell = tok.convert_tokens_to_ids("cell")
    assert cell_weights(pb, cell, 1.0) is None
    w = cell_weights(pb, cell, 4.0)
    words = [tok.convert_ids_to_tokens(int(pb.input_ids[r, q - 1])) for r, q, _ in pb.context_targets]
    assert w.tolist() == [4.0 if word == "cell" else 1.0 for word in words]
    assert 4.0 in w.tolist() and 1.0 in w.tolist()  # colour questions name a cell, exist ones colour + shape
    rows = torch.rand(len(pb.context_targets), 2, pb.input_ids.shape[1]).softmax(-1)
    plain = L.target_nll(rows, pb.context_targets)
    assert torch.allclose(L.target_nll(rows, pb.context_targets, torch.ones(len(w))), plain)
    assert L.target_nll(rows, pb.context_targets, w) > plain


def test_search_weight_scales_the_shape_words_targets_and_combines_with_the_cell_weight():
    """--search-weight: the word and context targets whose query is a shape word (exist and spatial questions'
    search) weigh more, the others keep 1; with --cell-weight the context weights multiply."""
    from jobs.train_lvlm_v2 import cell_weights, combined, search_weights

    tok = V.build_tokenizer()
    rng = np.random.default_rng(7)
    scenes = [world.sample_scene(rng, "train") for _ in range(3)]
    pb = V.pack_batch(tok, [V.draw_branches(s, rng, n_image=6, n_fact=0, n_text=0, qtypes=("color", "spatial"))
                            for s in scenes])
    shapes = torch.as_tensor(tok.convert_tokens_to_ids(list(world.SHAPES)))
    assert search_weights(pb, pb.word_targets, shapes, 1.0) is None
    assert search_weights(pb, [], shapes, 3.0) is None
    for targets in (pb.word_targets, pb.context_targets):
        w = search_weights(pb, targets, shapes, 3.0)
        words = [tok.convert_ids_to_tokens(int(pb.input_ids[r, q])) for r, q, _ in targets]
        assert w.tolist() == [3.0 if word in world.SHAPES else 1.0 for word in words]
        assert 3.0 in w.tolist() and 1.0 in w.tolist()  # spatial questions' shape words, colour ones' cells
    cell = tok.convert_tokens_to_ids("cell")
    both = combined(cell_weights(pb, cell, 2.0), search_weights(pb, pb.context_targets, shapes, 3.0))
    assert sorted(set(both.tolist())) == [2.0, 3.0]  # a context query is a cell word or a shape word
    assert combined(None, None) is None


def test_cell_grounding_maps_patches_to_their_cells_and_trains_the_projector():
    """--cell-grounding: each visual token's cell is the one its patch lies in (2x2 patches a cell, raster
    order, as ``world.CELL_WORDS``), and a few steps on the loss alone raise the cosine of the projected tokens
    with their own cell word's embedding (the projector learns the row x column conjunction)."""
    from jobs.train_lvlm_v2 import cell_grounding_loss, patch_cells

    cells = patch_cells()
    assert cells.shape == (V.N_VISUAL,) and cells.unique().numel() == len(world.CELL_WORDS)
    for obj in [world.sample_scene(np.random.default_rng(s), "train")[0] for s in range(5)]:
        assert {int(cells[p]) for p in world.patch_indices(obj)} == {world.CELL_WORDS.index(world.cell_word(obj.row, obj.col))}
    tok = V.build_tokenizer()
    torch.manual_seed(0)
    model = V.build_model("tiny", tokenizer=tok)
    ids = torch.as_tensor(tok.convert_tokens_to_ids(list(world.CELL_WORDS)))
    rng = np.random.default_rng(1)
    px = C.pixel_values([V.render(world.sample_scene(rng, "train"), world.sample_background(rng)) for _ in range(4)])
    with torch.no_grad():
        feats = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    opt = torch.optim.Adam([*model.model.multi_modal_projector.parameters(),
                            model.model.language_model.get_input_embeddings().weight], lr=1e-2)
    first = cell_grounding_loss(model, feats, ids)
    for _ in range(30):
        loss = cell_grounding_loss(model, feats, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cell_grounding_loss(model, feats, ids) < 0.7 * first


def test_shape_grounding_labels_object_patches_and_trains_the_projector():
    """--shape-grounding: the labels are each object's shape on its 2x2 patches and -100 on the background, the
    batch's scenes are the ones rendered (hidden-fact images show a subset), and a few steps on the loss alone
    lower it (the projector points object tokens at their shape word)."""
    from jobs.train_lvlm_v2 import parse_args, patch_shapes, shape_grounding_loss, vqa_batch

    tok = V.build_tokenizer()
    args = parse_args(["--clip", "x", "--output", "x", "--ckpt", "x", "--batch", "4"])
    px, pb, keep, scenes = vqa_batch(tok, np.random.default_rng(3), args, (20, 28), 2)
    assert len(scenes) == px.shape[0] == 4 and keep is None
    labels = patch_shapes(scenes)
    for i, objs in enumerate(scenes):
        assert int((labels[i] >= 0).sum()) == 4 * len(objs)
        for o in objs:
            assert {int(labels[i, p]) for p in world.patch_indices(o)} == {world.SHAPES.index(o.shape)}
    torch.manual_seed(0)
    model = V.build_model("tiny", tokenizer=tok)
    ids = torch.as_tensor(tok.convert_tokens_to_ids(list(world.SHAPES)))
    assert tok.unk_token_id not in ids.tolist()
    with torch.no_grad():
        feats = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    opt = torch.optim.Adam([*model.model.multi_modal_projector.parameters(),
                            model.model.language_model.get_input_embeddings().weight], lr=1e-2)
    first = shape_grounding_loss(model, feats, ids, labels)
    for _ in range(30):
        loss = shape_grounding_loss(model, feats, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert shape_grounding_loss(model, feats, ids, labels) < 0.7 * first


def test_captured_attention_rows_equal_eager_maps_under_sdpa():
    """The supervised rows recomputed from captured inputs (forward on SDPA) equal eager's attention maps, and
    the loss on them trains (gradients reach the supervised layer)."""
    from actors import shapes_lvlm as L
    from actors.attention_rows import AttentionCapture

    tok = V.build_tokenizer()
    model = V.build_model("tiny", tokenizer=tok)
    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng, "train", (3, 8)) for _ in range(2)]
    pb = V.pack_batch(tok, [V.draw_branches(s, rng, n_image=3, n_fact=1, n_text=1) for s in scenes])
    px = C.pixel_values([V.render(s, world.sample_background(rng)) for s in scenes])
    model.config.text_config._attn_implementation = "eager"
    logits_eager, _, maps = L.packed_logits(model, px, pb, output_attentions=True)
    model.config.text_config._attn_implementation = "sdpa"
    with AttentionCapture(model.model.language_model, {0, 1, 2}) as cap:
        logits, _ = L.packed_logits(model, px, pb)
    assert torch.allclose(logits, logits_eager, atol=1e-4)
    for layer, targets in ((0, pb.word_targets), (1, pb.context_targets), (2, pb.hop_targets)):
        rows = cap.rows(layer, targets, heads=1)
        ref = maps[layer][[t[0] for t in targets], :1, [t[1] for t in targets]]
        assert rows.shape == ref.shape and torch.allclose(rows, ref, atol=1e-5)
        loss = L.attention_target_loss(maps[layer], targets, 1)
        assert torch.allclose(L.target_nll(rows, targets), loss, atol=1e-5)
    L.target_nll(cap.rows(0, pb.word_targets, heads=1), pb.word_targets).backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_lookup_diagnostic_measures_cell_and_grid_line_attention(tmp_path, capsys):
    """jobs/diagnose_lvlm_lookup.py on a fresh tiny v2 LVLM: near-uniform attention from the cell word puts less
    mass on one cell's 4 patches than on the 24 patches of its grid row or column, with all tokens and half."""
    from jobs import diagnose_lvlm_lookup as D

    with pytest.raises(SystemExit):
        D.parse_args(["--help"])
    assert "by what its tokens show" in capsys.readouterr().out
    assert all(it.question_type in ("color", "shape") for it in D.cell_items(1234, 6))
    V.build_model("tiny").save_pretrained(tmp_path / "lvlm")
    rows = D.main(["--model", str(tmp_path / "lvlm"), "--n", "6", "--layer", "1", "--heads", "1", "--threads", "1",
                   "--shuffled", "--json", str(tmp_path / "d.json")])
    assert [(r["keep"], r["shuffled"]) for r in rows] == [(1.0, False), (0.5, False), (1.0, True), (0.5, True)]
    assert json.loads((tmp_path / "d.json").read_text()) == rows
    for r in rows:
        assert 0 < r["cell_mass"] < 1 and 0 <= r["accuracy"] <= 1
        # the cell's patches lie on its grid row and on its grid column, which hold other tokens too
        assert r["cell_mass"] < min(r["cell_word_on_row_mass"], r["cell_word_on_column_mass"])
        assert max(r["cell_word_on_row_mass"], r["cell_word_on_column_mass"]) < 1


def test_grid_line_mass_follows_the_kept_tokens_order():
    """The line masses read each visual slot's patch from the keep list, so they hold under a shuffled order."""
    from jobs.diagnose_lvlm_lookup import grid_line_mass

    obj = world.SceneObject(shape="circle", color="red", row=2, col=4, dx=0, dy=0, size=12)  # cell rows 4-5, columns 8-9 of the 12x12 grid
    kept = [4 * 12 + 8, 0, 11 * 12 + 9, 5 * 12 + 3]  # on both lines, on neither, on the column, on the row
    mask = torch.tensor([False, True, True, True, True, False])  # <s>, 4 visual slots, a text token
    rows = torch.tensor([[0.1, 0.4, 0.1, 0.2, 0.1, 0.1]])
    on_row, on_col = grid_line_mass(rows, mask, kept, obj)
    assert (round(on_row, 4), round(on_col, 4)) == (0.5, 0.6)


def assert_trains_the_residual_only(model, loss) -> None:
    """25 Adam steps on ``loss()`` alone lower it by 30%, and the output head it reads through stays as it was."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    head_before = model.lm_head.weight.detach().clone()
    first = loss()
    for _ in range(25):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss() < 0.7 * first
    assert torch.equal(model.lm_head.weight, head_before)  # the output head is read, not trained


def test_gather_targets_name_the_cell_words_object_and_the_loss_trains_the_residual():
    """--gather-sup: each colour / shape question's cell word is paired with the colour and shape of the object
    in that cell, other question types are skipped, and a few steps on the loss alone lower it."""
    from actors import shapes_lvlm as L
    from actors.attention_rows import AttentionCapture
    from jobs.train_lvlm_v2 import gather_loss, gather_targets, parse_args, vqa_batch

    tok = V.build_tokenizer()
    args = parse_args(["--clip", "x", "--output", "x", "--ckpt", "x", "--batch", "4", "--gather-sup", "1",
                       "--hop-layer", "2"])  # the tiny preset has three layers
    px, pb, _, scenes = vqa_batch(tok, np.random.default_rng(5), args, (20, 28), 2)
    cells = torch.as_tensor(tok.convert_tokens_to_ids(list(world.CELL_WORDS)))
    places, colours, shapes = gather_targets(pb, scenes, cells)
    cell_questions = [(row, key) for row, _, (key, *_) in pb.hop_targets if int(pb.input_ids[row, key]) in cells]
    assert places and places == cell_questions and len(places) < len(pb.hop_targets)
    for (row, key), c, s in zip(places, colours.tolist(), shapes.tolist(), strict=True):
        r, col = divmod(world.CELL_WORDS.index(tok.convert_ids_to_tokens(int(pb.input_ids[row, key]))), world.CELLS)
        (obj,) = [o for o in scenes[row] if (o.row, o.col) == (r, col)]
        assert (world.COLOR_NAMES[c], world.SHAPES[s]) == (obj.color, obj.shape)
    torch.manual_seed(0)
    model = V.build_model("tiny", tokenizer=tok)
    ids = [torch.as_tensor(tok.convert_tokens_to_ids(list(w))) for w in (world.COLOR_NAMES, world.SHAPES)]

    def loss() -> torch.Tensor:
        with AttentionCapture(model.model.language_model, {args.hop_layer}) as cap:
            L.packed_logits(model, px, pb)
        return gather_loss(model, cap.inputs[args.hop_layer]["hidden"], (places, colours, shapes), *ids)

    assert_trains_the_residual_only(model, loss)


def test_row_gather_targets_name_the_spatial_answer_row_and_the_loss_trains_the_residual():
    """--row-gather: each spatial question's shape word is paired with its answer row (exist questions' shape
    words, answered yes / no, are skipped), and a few steps on the loss alone lower it, the head untouched."""
    from actors import shapes_lvlm as L
    from actors.attention_rows import AttentionCapture
    from jobs.train_lvlm_v2 import parse_args, row_gather_loss, row_gather_targets, vqa_batch

    tok = V.build_tokenizer()
    args = parse_args(["--clip", "x", "--output", "x", "--ckpt", "x", "--batch", "6", "--row-gather", "1",
                       "--hop-layer", "2"])  # the tiny preset has three layers
    px, pb, _, scenes = vqa_batch(tok, np.random.default_rng(3), args, (20, 28), 1)
    shapes = torch.as_tensor(tok.convert_tokens_to_ids(list(world.SHAPES)))
    digits = torch.as_tensor(tok.convert_tokens_to_ids(list(world.ROW_ANSWERS)))
    places, rows = row_gather_targets(pb, shapes, digits)
    searches = [(row, key) for row, _, (key, *_) in pb.hop_targets if int(pb.input_ids[row, key]) in shapes]
    assert places and len(places) < len(searches)  # the batch holds exist questions too
    for (row, key), r in zip(places, rows.tolist(), strict=True):
        colour = tok.convert_ids_to_tokens(int(pb.input_ids[row, key - 1]))
        shape = tok.convert_ids_to_tokens(int(pb.input_ids[row, key]))
        (obj,) = [o for o in scenes[row] if (o.color, o.shape) == (colour, shape)]  # a spatial pair occurs once
        assert obj.row == r
    torch.manual_seed(0)
    model = V.build_model("tiny", tokenizer=tok)

    def loss() -> torch.Tensor:
        with AttentionCapture(model.model.language_model, {args.hop_layer}) as cap:
            L.packed_logits(model, px, pb)
        return row_gather_loss(model, cap.inputs[args.hop_layer]["hidden"], (places, rows), digits)

    assert_trains_the_residual_only(model, loss)


def test_shape_phase_runs_the_first_stage2_steps_with_every_token_in_order_and_no_lookup_levers():
    """--shape-phase N: stage-2 steps before N get every visual token in order and the lookup levers off (the
    shape pair stays on); step N on, and every stage-1 step, get the flags as given."""
    from jobs.train_lvlm_v2 import (
        SHAPE_PHASE_OFF,
        parse_args,
        phase_args,
        shuffled_order,
        visual_keep,
    )

    args = parse_args(["--clip", "x", "--output", "x", "--ckpt", "x", "--batch", "4", "--shape-phase", "3",
                       "--drop-visual", "1", "--shuffle-visual", "1", "--cell-grounding", "1", "--cell-weight", "2",
                       "--search-weight", "2", "--row-gather", "1", "--shape-grounding", "1", "--gather-sup", "1"])
    levers = {k: getattr(args, k) for k in SHAPE_PHASE_OFF}
    assert all(levers[k] != v for k, v in SHAPE_PHASE_OFF.items())  # every lever is given a non-neutral value
    inside, after, stage1 = phase_args(args, 2, 2), phase_args(args, 2, 3), phase_args(args, 1, 0)
    assert {k: getattr(inside, k) for k in SHAPE_PHASE_OFF} == SHAPE_PHASE_OFF
    assert (inside.shape_grounding, inside.gather_sup) == (1.0, 1.0)
    assert after is args and stage1 is args and {k: getattr(args, k) for k in SHAPE_PHASE_OFF} == levers
    for flags, kept_all_in_order in ((inside, True), (after, False)):  # the augmentations see this step's flags
        drop, order = np.random.default_rng(2), np.random.default_rng(3)
        keep = shuffled_order(visual_keep([[]] * 4, drop, flags), 4, order, flags)
        assert (keep is None) == kept_all_in_order


def test_autocast_runs_the_forward_in_bf16_only_where_asked_and_the_cpu_has_it(monkeypatch):
    from jobs import train_lvlm_v2

    layer, x = torch.nn.Linear(8, 8), torch.randn(3, 8)
    with train_lvlm_v2.forward_precision("none"):
        assert layer(x).dtype == torch.float32
    monkeypatch.setattr(train_lvlm_v2, "native_bf16", lambda: True)
    for asked in ("bf16", "auto"):
        with train_lvlm_v2.forward_precision(asked):
            assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32 and layer.weight.dtype == torch.float32  # only inside the block
    monkeypatch.setattr(train_lvlm_v2, "native_bf16", lambda: False)  # a CPU without native bf16
    with train_lvlm_v2.forward_precision("auto"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(SystemExit, match="no native bfloat16"):
        train_lvlm_v2.forward_precision("bf16")
