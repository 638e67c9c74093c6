"""jobs/train_accm.py --smoke: both stages on Ray Train + DeepSpeed ZeRO-2, checkpoint, resume, ablation eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_accm_smoke_runs_resumes_and_evaluates(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "jobs/train_accm.py", "--smoke", "--workdir", str(tmp_path),
                           "--pretrain-objects", "1-4", "--pretrain-keep", "2-8", "--pretrain-read-steps", "1",
                           "--pretrain-targets", "abstain"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    (work,) = tmp_path.glob("accm-smoke-*")
    summary = json.loads((work / "summary.json").read_text())

    assert summary["pretrain"]["step"] == 2
    assert summary["accm"]["step"] == 2 and summary["accm"]["started_at"] == 0
    # same run name again: Ray Train hands the worker its latest checkpoint; DeepSpeed state restored
    assert summary["accm-resume"]["started_at"] == 2 and summary["accm-resume"]["step"] == 3
    ckpt = Path(summary["accm-resume"]["checkpoint"])
    assert (ckpt / "ds" / "latest_ds").is_dir()

    table = summary["eval"]
    for key in ("all tokens", "87.5% prumerge_plus", "87.5% + first beam caption", "87.5% + selector (ACCM)",
                "87.5% + one-candidate caption (no selector)", "87.5% + oracle caption", "93.75% + selector (ACCM)", "75% prumerge_plus"):
        assert 0.0 <= table[key]["accuracy"] <= 1.0 and table[key]["mflops_per_item"] > 0
    for row in table.values():  # the by-type breakdown partitions the same items
        assert set(row["accuracy_by_type"]) <= set(shapes.QUESTION_TYPES)
    assert table["87.5% + oracle caption"]["caption_spliced"] == 1.0  # a true fact always has words
    assert 0.0 <= table["87.5% + first beam caption"]["caption_spliced"] <= 1.0
    assert 0.0 <= table["87.5% + one-candidate caption (no selector)"]["caption_is_fact"] <= 1.0
    assert "caption_spliced" not in table["87.5% prumerge_plus"]
    # the caption model + selector cost shows up in ACCM's FLOPs, not in the oracle row's
    assert table["87.5% + selector (ACCM)"]["mflops_per_item"] > table["87.5% + oracle caption"]["mflops_per_item"]

    # the shipped-layout folders load through the captioner tier's entry point
    from actors.accm import ACCMCaptioner

    accm = ACCMCaptioner.from_pretrained(str(work / "captioner"), str(work / "selector"))
    assert accm.captioner.config.beams == 3


def test_train_accm_steps_train_the_reference_architecture(tmp_path):
    """The ACCM authors' architecture (a user adapting ACCM to another LVLM) through train_accm's own training
    code: ``build_or_load`` from the arch flags (ClipCap mapper with a P-slot prefix + the nn.TransformerEncoder
    selector), ``make_batch`` from the base pruner, one pre-training and one ACCM-stage loss with gradients into
    the parts each stage trains, and the folders load with the authors' parameter names. The Ray Train +
    DeepSpeed harness around these steps does not depend on the architecture: the smoke above runs it."""
    import torch

    from actors.accm import ACCMCaptioner
    from actors.engine import LlavaEngine
    from actors.tiny import build_tiny_llava

    sys.path.insert(0, str(REPO / "jobs"))
    import train_accm as T

    build_tiny_llava(tmp_path / "lvlm", vision_hidden=32, text_hidden=32, heads=2, kv_heads=1)
    engine = LlavaEngine.from_pretrained(str(tmp_path / "lvlm"))
    arch_c = {**T.SMOKE_CAPTIONER, "mapper_arch": "clipcap", "patch_prefix": False, "mapper_heads": 4,
              "beam_rank": "mean", "stop_on_eos": False, "decode": "raw"}
    arch_s = {**T.SMOKE_SELECTOR, "arch": "torch_transformer", "rank_embedding": False, "heads": 4}
    config = {"captioner_arch": arch_c, "selector_arch": arch_s, "seed": 0, "keep": 8}
    with torch.enable_grad():
        captioner, selector = T.build_or_load(config, engine)
        model = T.ACCMTrainable(captioner, selector).train()
        batch = T.make_batch(engine, 0, "train", list(range(4)), 8)
        pre = model("pretrain", batch)
        pre["loss"].backward()
        assert torch.isfinite(pre["loss"]) and captioner.mapper.linear.weight.grad.abs().sum() > 0
        assert captioner.decoder.get_input_embeddings().weight.grad.abs().sum() > 0
        model.zero_grad()
        candidates = captioner.beam_search(batch["discarded"], batch["questions"]).captions
        out = model("accm", batch, best_captions=[c[0] for c in candidates], candidates=candidates,
                    best=torch.zeros(len(candidates), dtype=torch.long))
        (out["caption_ce"] + out["selector_kl"]).backward()
        assert all(p.grad is not None for p in selector.trainable_parameters())
        assert all(p.grad is None for p in selector.text_encoder.parameters())  # the text encoder is frozen
    captioner.save_pretrained(tmp_path / "captioner")
    selector.save_pretrained(tmp_path / "selector")
    accm = ACCMCaptioner.from_pretrained(str(tmp_path / "captioner"), str(tmp_path / "selector"))
    cfg = accm.captioner.config
    assert (cfg.mapper_arch, cfg.patch_prefix, cfg.beam_rank, cfg.decode) == ("clipcap", False, "mean", "raw")
    assert accm.selector.config.arch == "torch_transformer"
    assert "transformer.layers.0.attn.to_keys_values.weight" in accm.captioner.mapper.state_dict()
    assert "layers.0.self_attn.in_proj_weight" in accm.selector.classifier.state_dict()


def test_pretrain_batches_follow_the_scene_size_and_budget_curriculum(tmp_path):
    """--pretrain-objects / --pretrain-keep: the items have the asked object counts, the mapper gets 64 - keep patches."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from actors.engine import LlavaEngine
    from actors.tiny import build_tiny_llava
    from jobs.train_accm import make_batch, parse_args
    from pipeline import shapes

    build_tiny_llava(tmp_path / "lvlm", vision_hidden=32, text_hidden=32, heads=2, kv_heads=1)
    engine = LlavaEngine.from_pretrained(str(tmp_path / "lvlm"))
    small = make_batch(engine, 0, "train", list(range(6)), 2, n_objects=(1, 1))
    assert small["discarded"].shape[:2] == (6, shapes.GRID * shapes.GRID - 2)
    want = [shapes.make_item(0, "train", i, n_objects=(1, 1)) for i in range(6)]
    assert small["questions"] == [it.question for it in want]
    assert small["facts"] == [shapes.fact(it.objects, it.question_type, it.question, it.target) for it in want]
    default = make_batch(engine, 0, "train", list(range(6)), 8)
    assert default["discarded"].shape[1] == shapes.GRID * shapes.GRID - 8
    assert default["questions"] == [shapes.make_item(0, "train", i).question for i in range(6)] != small["questions"]
    args = parse_args(["--pretrain-objects", "1-4", "--pretrain-keep", "1-8"])
    assert shapes.parse_lo_hi(args.pretrain_objects) == (1, 4) and shapes.parse_lo_hi(args.pretrain_keep) == (1, 8)


def test_target_slots_point_at_the_named_objects_discarded_patches(tmp_path):
    """make_batch's target_slots: the slot of the fact's object in the discarded list (all counted objects for
    count questions); a slot's patch is that object's cell; objects the base pruner kept have no slot."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from actors.engine import LlavaEngine
    from actors.tiny import build_tiny_llava
    from jobs.train_accm import make_batch, target_slots
    from pipeline import shapes

    build_tiny_llava(tmp_path / "lvlm", vision_hidden=32, text_hidden=32, heads=2, kv_heads=1)
    engine = LlavaEngine.from_pretrained(str(tmp_path / "lvlm"))
    items = [shapes.make_item(0, "train", i) for i in range(10)]
    batch = make_batch(engine, 0, "train", list(range(10)), 8)
    seen_count = False
    for item, slots, whole in zip(items, batch["target_slots"], batch["fact_visible"], strict=True):
        # the fact is visible iff every object it is about is among the discarded patches (exist-no: none)
        assert whole == (len(slots) == len(item.target if item.question_type == "count" else item.target[:1]))
        if item.question_type == "exist" and not item.target:
            assert whole and slots == []
    for item, slots, visible in zip(items, batch["target_slots"], batch["target_discarded"], strict=True):
        counted = item.target if item.question_type == "count" else item.target[:1]
        cells = {item.objects[o].row * shapes.GRID + item.objects[o].col for o in counted}
        assert len(slots) <= len(cells)
        if item.question_type in ("color", "shape", "spatial"):
            assert bool(slots) == visible
        seen_count |= item.question_type == "count" and len(slots) > 1
    assert seen_count
    # slot_labels: the (colour, shape, row, column) of the object in each discarded slot, -100 on background
    labels = batch["slot_labels"]
    assert labels.shape == (10, 64 - 8, 4)
    for item, slots, row in zip(items, batch["target_slots"], labels, strict=True):
        assert int((row[:, 0] >= 0).sum()) <= len(item.objects)
        if item.question_type == "color" and slots:
            o = item.objects[item.target[0]]
            assert row[slots[0]].tolist() == [shapes.COLOR_NAMES.index(o.color), shapes.SHAPES.index(o.shape),
                                              o.row, o.col]
    assert int((labels[..., 0] >= 0).sum()) > 50  # most objects are discarded at keep 8
    # a slot indexes the discarded list: the patch it stands for is the object's cell
    discarded = list(range(64))[8:]  # patches 8..63 discarded, 0..7 kept
    item = next(it for it in items if it.question_type == "color")
    o = item.objects[item.target[0]]
    cell = o.row * shapes.GRID + o.col
    assert target_slots(item, discarded) == ([cell - 8] if cell >= 8 else [])


def test_init_captioner_cuts_the_mapper_and_keeps_the_rest(tmp_path):
    """--init-captioner + mapper_layers: the new folder holds the source's decoder and its first mapper blocks,
    prices fewer FLOPs, refuses other arch changes and never overwrites an existing caption model."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from actors.accm import caption_model_dims
    from actors.captioner import CaptionModel, build_caption_model
    from actors.tiny import build_tokenizer
    from jobs.train_accm import init_from
    from pipeline.flops import caption_model_flops

    src = build_caption_model(build_tokenizer(), feature_dim=24, hidden=32, decoder_layers=1, decoder_heads=2,
                              prefix_len=4, mapper_layers=2, mapper_heads=2, patch_prefix=True, seed=3)
    src.save_pretrained(tmp_path / "src")
    init_from(str(tmp_path / "src"), str(tmp_path / "one"), {"mapper_layers": 1})
    one = CaptionModel.from_pretrained(tmp_path / "one")
    assert one.config.mapper_layers == 1 and len(one.mapper.encoder.blocks) == 1
    kept = one.mapper.state_dict()
    for key, value in src.mapper.state_dict().items():
        if key.startswith("encoder.blocks.1."):
            assert key not in kept
        else:
            torch.testing.assert_close(kept[key], value)
    for a, b in zip(one.decoder.parameters(), src.decoder.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    def cost(model):
        mapper, decoder = caption_model_dims(model)
        return caption_model_flops(mapper, decoder, discarded_tokens=56, prefix_len=4, question_tokens=9, beams=3,
                                   caption_tokens=6, feature_dim=24, patch_prefix=True)

    assert cost(one) < cost(src)
    with pytest.raises(SystemExit, match="already holds"):
        init_from(str(tmp_path / "src"), str(tmp_path / "one"), {"mapper_layers": 0})
    with pytest.raises(SystemExit, match="hidden"):
        init_from(str(tmp_path / "src"), str(tmp_path / "other"), {"mapper_layers": 1, "hidden": 64})
    with pytest.raises(ValueError):
        init_from(str(tmp_path / "src"), str(tmp_path / "deeper"), {"mapper_layers": 3})


def test_pretrain_batch_without_visible_targets_teaches_nothing():
    """--pretrain-targets discarded: a batch where no fact is visible to the mapper gives a zero loss and zero
    gradients (it used to fall back to training every row, i.e. on facts the mapper cannot see)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from actors.captioner import build_caption_model
    from actors.selector import build_selector
    from actors.tiny import build_tokenizer
    from jobs.train_accm import ACCMTrainable

    cap = build_caption_model(build_tokenizer(), feature_dim=24, hidden=32, decoder_layers=1, decoder_heads=2,
                              prefix_len=4, mapper_layers=1, mapper_heads=2, patch_prefix=True, seed=3)
    module = ACCMTrainable(cap, build_selector(text_hidden=16, text_layers=1, text_heads=2, projection_dim=16,
                                               layers=1, heads=2))
    batch = {"discarded": torch.randn(2, 6, 24), "questions": ["what color is the circle?"] * 2,
             "facts": ["the circle is red.", "the circle is blue."], "target_slots": [[0], [1]]}
    some = module("pretrain", {**batch, "train_rows": [1]})
    some["loss"].backward()
    assert some["loss"] > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in cap.parameters())
    cap.zero_grad(set_to_none=True)
    none = module("pretrain", {**batch, "train_rows": []})
    none["loss"].backward()
    assert none["loss"] == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in cap.parameters())


def _tiny_v2_folders(root):
    """A tiny random v2 CLIP folder and a tiny v2 LVLM on its tower (the shapes and file layout of the shipped
    ones; the weights do not matter for what these tests check)."""
    from actors import shapes_clip as C
    from actors import shapes_lvlm_v2 as V

    tok = C.build_tokenizer()
    C.build_clip("tiny", tokenizer=tok).save_pretrained(root / "clip")
    C.build_processor(tok).save_pretrained(root / "clip")
    vtok = V.build_tokenizer()
    lvlm = V.build_model("tiny", tokenizer=vtok)
    V.load_clip_tower(lvlm, str(root / "clip"))
    lvlm.save_pretrained(root / "lvlm")
    V.build_processor(vtok).save_pretrained(root / "lvlm")
    return str(root / "clip"), str(root / "lvlm")


def test_v2_batches_cover_every_patch_of_the_named_objects(tmp_path):
    """World v2: objects hold 2x2 patches. target_slots lists every discarded patch of the fact's objects,
    slot_labels label all four patches of an object with its cell (row/column over the 6 cells), the mapper
    reads the CLIP's projected patches when asked, and a fact is visible iff each of its objects keeps a
    discarded patch."""
    import torch

    from actors.accm_batches import make_batch, slot_attributes
    from actors.engine import LlavaEngine
    from pipeline import shapes_v2

    clip, lvlm = _tiny_v2_folders(tmp_path)
    engine = LlavaEngine.from_pretrained(lvlm, clip_text_url=clip)
    n = shapes_v2.GRID ** 2
    batch = make_batch(engine, 0, "train", list(range(10)), 18, world=shapes_v2, features="projected")
    width = engine.text_guide.visual_projection.out_features
    assert batch["discarded"].shape == (10, n - 18, width) and batch["mapper_full"].shape == (10, n, width)
    plain = make_batch(engine, 0, "train", list(range(10)), 18, world=shapes_v2)
    assert plain["discarded"].shape == (10, n - 18, engine.config.vision_config.hidden_size)
    assert slot_attributes(shapes_v2) == (len(shapes_v2.COLOR_NAMES), len(shapes_v2.SHAPES), 6, 6)
    labels = batch["slot_labels"]
    assert int(labels[..., 2:].max()) < shapes_v2.CELLS and int((labels[..., 0] >= 0).sum()) > 10 * 40
    kept = [set(range(n)) - set(d) for d in engine.prune(
        engine.encode_images(engine.preprocess([shapes_v2.render_item(it) for it in batch["items"]])),
        "prumerge_plus", 18, batch["ids"], batch["questions"]).discarded_indices.tolist()]
    for item, slots, visible, row, keep in zip(batch["items"], batch["target_slots"], batch["fact_visible"], labels,
                                               kept, strict=True):
        objs = item.target if item.question_type == "count" else item.target[:1]
        dropped = sorted(set(range(n)) - keep)
        # every discarded patch of every object the fact is about, and nothing else
        want = sorted(p for o in objs for p in shapes_v2.patch_indices(item.objects[o]) if p not in keep)
        assert sorted(dropped[s] for s in slots) == want
        if item.question_type == "color" and slots:
            o = item.objects[item.target[0]]
            want = [shapes_v2.COLOR_NAMES.index(o.color), shapes_v2.SHAPES.index(o.shape), o.row, o.col]
            assert all(row[s].tolist() == want for s in slots)
        if item.question_type in ("color", "shape", "spatial"):
            assert visible == bool(slots)
    with pytest.raises(ValueError, match="clip_text_url"):
        make_batch(LlavaEngine.from_pretrained(lvlm), 0, "train", [0], 18, world=shapes_v2, features="projected")
    assert torch.isfinite(batch["discarded"]).all()


def test_v2_training_steps_on_projected_patches_with_the_clip_text_selector(tmp_path):
    """train_accm's pieces on world v2: a reference-style caption model on the CLIP's projected patches, a
    selector whose frozen text encoder is the CLIP's text tower, one pre-training step with attention
    supervision and the v2 slot read-out, one ACCM-stage step; then the ablation runs on the v2 benchmark."""
    import torch

    from actors.engine import LlavaEngine

    sys.path.insert(0, str(REPO / "jobs"))
    import train_accm as T

    from jobs.accm_ablation import evaluate

    clip, lvlm = _tiny_v2_folders(tmp_path)
    engine = LlavaEngine.from_pretrained(lvlm, clip_text_url=clip)
    arch_c = {**T.SMOKE_CAPTIONER, "input_features": "projected"}
    arch_s = {**T.SMOKE_SELECTOR, "text_encoder_dir": clip, "template": "{q} {c}"}
    config = {"captioner_arch": arch_c, "selector_arch": arch_s, "seed": 0, "keep": 18, "world": "v2"}
    with torch.enable_grad():
        captioner, selector = T.build_or_load(config, engine)
        assert captioner.config.input_features == "projected"
        # the selector reads the CLIP's own text tower (not a random one of the same width)
        assert torch.equal(selector.text_encoder.text_projection.weight, engine.text_guide.text_projection.weight)
        model = T.ACCMTrainable(captioner, selector, slot_reader=True,
                                attributes=T.slot_attributes(T.WORLDS["v2"])).train()
        batch = T.batches(config, engine, "projected")(0, "train", list(range(4)), 18)
        pre = model("pretrain", batch, attention_weight=1.0, read_weight=1.0)
        pre["loss"].backward()
        assert torch.isfinite(pre["loss"]) and pre["slot_read_loss"] > 0
        assert model.slot_reader.weight.grad.abs().sum() > 0
        model.zero_grad()
        candidates = captioner.beam_search(batch["discarded"], batch["questions"]).captions
        kl = T.candidate_kl(engine, batch, candidates)
        # --accm-reference answer: KL to the one-hot answer = minus the mean log-probability of its tokens
        nll = T.candidate_kl(engine, batch, candidates, "answer")
        assert nll.shape == kl.shape and bool((nll > 0).all())
        from actors.accm import answer_log_probs
        logp = answer_log_probs(engine, [batch["retained"][0]], [batch["questions"][0]], [candidates[0][1]],
                                [batch["answers"][0]])[0]
        ids = engine.tokenizer(" " + batch["answers"][0].strip(), add_special_tokens=False)["input_ids"]
        picked = logp[torch.arange(len(ids) + 1), ids + [engine.eos_token_id]]
        assert torch.allclose(nll[0, 1], -picked.mean(), atol=1e-5)
        with pytest.raises(ValueError, match="reference"):
            T.candidate_kl(engine, batch, candidates, "oracle")
        out = model("accm", batch, best_captions=[c[0] for c in candidates], candidates=candidates,
                    best=kl.argmin(1))
        (out["caption_ce"] + out["selector_kl"]).backward()
        assert all(p.grad is not None for p in selector.trainable_parameters())
    captioner.save_pretrained(tmp_path / "captioner")
    selector.save_pretrained(tmp_path / "selector")
    table = evaluate(lvlm, str(tmp_path / "captioner"), str(tmp_path / "selector"), n=4, seed=1, batch_size=4,
                     split="val", world="v2", clip=clip, rates=(0.875,))
    assert {"all tokens", "75% divprune", "75% cdpruner", "87.5% + selector (ACCM)"} <= set(table)
    for v in table.values():  # binomial SE of the accuracy over 4 items
        assert v["n"] == 4 and abs(v["se"] - (v["accuracy"] * (1 - v["accuracy"]) / 4) ** 0.5) < 1e-9
    # 87.5% of 144 patches keeps 18: the base pruner's row prices fewer LLM FLOPs than all tokens
    assert table["87.5% prumerge_plus"]["mflops_per_item"] < table["all tokens"]["mflops_per_item"]
    # --count-facts list: count items' facts name objects (or abstain), in training batches and the oracle rows
    counts = T.batches({**config, "count_facts": "list"}, engine, "projected")(0, "train", [2, 7, 12], 18)
    assert counts["qtypes"] == ["count"] * 3 and all(counts["fact_visible"])
    assert all(f == T.ABSTAIN_CAPTION or f.startswith("the ") for f in counts["facts"])
    listed = evaluate(lvlm, str(tmp_path / "captioner"), str(tmp_path / "selector"), n=4, seed=1, batch_size=4,
                      split="val", world="v2", clip=clip, rates=(0.875,), reference_methods=("random",),
                      count_facts="list")
    assert listed["87.5% + oracle caption"]["n"] == 4
    # a trained caption model loaded with a longer caption budget (list captions)
    longer, _ = T.build_or_load({**config, "init_captioner": str(tmp_path / "captioner"), "max_caption_tokens": 33},
                                engine)
    assert longer.config.max_caption_tokens == 33 != captioner.config.max_caption_tokens
    with pytest.raises(ValueError, match="patches"):  # a v1-sized LVLM is refused on the v2 world
        from actors.tiny import build_tiny_llava

        build_tiny_llava(tmp_path / "v1", vision_hidden=32, text_hidden=32, heads=2, kv_heads=1)
        T.make_batch(LlavaEngine.from_pretrained(str(tmp_path / "v1")), 0, "train", [0], 18, world=T.WORLDS["v2"])
