"""Proving ground v2's models: the CLIP (text + vision towers) and the LVLM on its tower, built and trained tiny.

Real transformers classes, real training loops (a few steps of the tiny presets), real folders loaded by path
the way a user loads openai/clip-vit-large-patch14-336 and llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors import shapes_clip as C  # noqa: E402
from actors import shapes_lvlm_v2 as V  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    from jobs import train_clip

    out = tmp_path_factory.mktemp("clip")
    args = ["--preset", "tiny", "--output", str(out / "model"), "--ckpt", str(out / "ckpt.pt"), "--batch", "8",
            "--eval-every", "3", "--ckpt-every", "2", "--threads", "1"]
    train_clip.main([*args, "--steps", "2"])
    first = torch.load(out / "ckpt.pt", weights_only=False)["state"]["step"]
    final = train_clip.main([*args, "--steps", "3", "--resume"])
    return out, first, final


def test_tokenizer_wraps_in_bos_eos_and_knows_every_word():
    tok = C.build_tokenizer()
    for i in range(30):
        item = world.make_item(3, "val", i)
        for text in (item.question, world.fact(item.objects, item.question_type, item.question, item.target)):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.unk_token_id not in ids, text


def test_clip_trains_resumes_and_serves_as_text_guide(trained_clip):
    from actors.pruners import TextGuide

    out, first, final = trained_clip
    assert first == 2  # the checkpoint of the first run, which the resumed run continued from
    log = json.loads((out / "model" / "training_log.json").read_text())
    # the first run's evaluation at step 2 is carried over: the second run resumed, it did not start again
    assert [e["step"] for e in log["log"] if "val" in e] == [2, 3]
    assert 0 <= final["question_patch_precision_at_4"] <= 1 and set(final["probe_accuracy"]) == {
        "color", "shape", "row", "col", "color_counts", "shape_counts"}
    assert set(final["objects_covered_by_top_cls_patches"]) == {
        f"{layer}_top{k}" for layer in ("feature_layer", "last_layer") for k in (72, 18)}
    from jobs import train_clip

    held_out = train_clip.main(["--evaluate", str(out / "model"), "--split", "test", "--eval-images", "6",
                                "--json", str(out / "test.json"), "--probes", "--probe-images", "8"])
    probes = held_out["linear_probes"]
    assert set(probes) == {"feature_layer", "projected"} and all(
        set(p) == {"color", "shape", "row", "col"} and all(0 <= v <= 1 for v in p.values()) for p in probes.values())
    assert json.loads((out / "test.json").read_text()) == held_out and held_out["split"] == "test"
    assert 0 <= held_out["image_to_text_top1"] <= 1 and "probe_accuracy" not in held_out
    guide = TextGuide.from_pretrained(str(out / "model"))
    emb = guide.embed_questions(["What row is the red circle in?", "How many blue objects are there?"])
    assert emb.shape == (2, C.PRESETS["tiny"]["projection"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the processor resizes and crops like CLIP's: any decodable image gets the tower's input size
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(out / "model"))
    for size in ((1, 1), (300, 200), (97, 96)):
        px = proc(images=Image.new("RGB", size, (200, 10, 10)), return_tensors="pt")["pixel_values"]
        assert px.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_lvlm_v2_attention_targets_point_at_the_named_objects():
    tok = V.build_tokenizer()
    for i in range(40):
        item = world.make_item(8, "val", i)
        words = tok.convert_ids_to_tokens(tok(item.question, add_special_tokens=False)["input_ids"])
        own, in_context, decisive = V.attention_targets(item.question_type, words, item.objects)
        if item.question_type in ("color", "shape"):  # the cell word after "cell"
            assert words[decisive - 1] == "cell" and words[decisive] in world.CELL_WORDS
        elif item.question_type == "count":
            assert words[decisive] in world.COLORS
        else:
            assert words[decisive] in world.SHAPES
        if item.question_type in ("color", "shape", "spatial") or (item.question_type == "exist" and item.answer == "yes"):
            # the answer's object(s): the last in-context target is exactly their 2x2 patches
            t = item.objects[item.target[0]]
            named = [o for o in item.objects if (o.color, o.shape) == (t.color, t.shape)] if item.question_type == "exist" else [t]
            assert sorted(in_context[-1][1]) == sorted(p for o in named for p in world.patch_indices(o))
        if item.question_type == "count":
            (j, keys), = own
            assert words[j] in world.COLORS and len(keys) == 4 * int(item.answer)
        if item.question_type in ("color", "shape"):  # the cell word's meaning is its own: the word layer learns it
            assert own[-1] == in_context[-1] and own[-1][0] == decisive


def test_lvlm_v2_trains_on_the_clip_tower_and_answers_any_image(trained_clip, tmp_path, monkeypatch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from jobs import train_lvlm_v2

    clip_dir = str(trained_clip[0] / "model")
    monkeypatch.setattr(train_lvlm_v2, "native_bf16", lambda: True)  # bf16 autocast runs (slowly) on any CPU
    state = train_lvlm_v2.main([
        "--autocast", "bf16",
        "--clip", clip_dir, "--preset", "tiny", "--output", str(tmp_path / "lvlm"), "--ckpt", str(tmp_path / "ck.pt"),
        "--stage1-steps", "1", "--stage2-steps", "2", "--batch", "2", "--val-items", "10", "--eval-every", "2",
        "--word-layer", "0", "--context-layer", "1", "--hop-layer", "2", "--threads", "1", "--log-every", "1",
        "--rope-theta", "500000", "--shape-phase", "1", "--drop-visual", "1", "--shuffle-visual", "1",
        "--shape-grounding", "1", "--gather-sup", "1", "--row-gather", "1",  # stage-2 step 0 in the phase, 1 not
    ])
    assert state["stage1_done"] and state["stage2_done"] and state["evals"][-1]["step"] == 2
    assert state["forward_precision"] == ["bf16"] and 0 <= state["evals"][-1]["val"]["all"] <= 1
    saved_config = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "lvlm")).config.text_config
    assert saved_config.rope_parameters["rope_theta"] == 500000.0  # --rope-theta reaches the shipped config
    # without the checkpoint (another machine), --resume goes on from the saved HF folder's weights and step
    (tmp_path / "ck.pt").unlink()
    saved = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "lvlm")).state_dict()
    common = ["--clip", clip_dir, "--preset", "tiny", "--output", str(tmp_path / "lvlm"), "--ckpt", str(tmp_path / "ck.pt"),
              "--stage1-steps", "1", "--batch", "2", "--val-items", "10", "--word-layer", "0", "--context-layer", "1",
              "--hop-layer", "2", "--threads", "1", "--resume"]
    train_lvlm_v2.main([*common, "--stage2-steps", "2"])  # nothing left to run: the folder is written back as loaded
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "lvlm")).state_dict()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())  # bf16 autocast left the weights float32
    again = train_lvlm_v2.main([
        "--clip", clip_dir, "--preset", "tiny", "--output", str(tmp_path / "lvlm"), "--ckpt", str(tmp_path / "ck.pt"),
        "--stage1-steps", "1", "--stage2-steps", "3", "--batch", "2", "--val-items", "10", "--eval-every", "3",
        "--word-layer", "0", "--context-layer", "1", "--hop-layer", "2", "--threads", "1", "--resume",
        "--count-list", "1.0", "--hide-fact-objects", "1.0",
    ])
    assert again["stage2_step"] == 3 and [e["step"] for e in again["evals"]] == [1, 2, 3]
    with pytest.raises(SystemExit):  # nothing to resume from
        train_lvlm_v2.main(["--clip", clip_dir, "--preset", "tiny", "--output", str(tmp_path / "nowhere"),
                            "--ckpt", str(tmp_path / "nowhere.pt"), "--resume"])
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "lvlm"))
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir)
    for name, value in clip.vision_model.state_dict().items():  # the frozen tower is the CLIP's, unchanged
        assert torch.equal(model.model.vision_tower.state_dict()[name], value), name
    # the card's table command runs on it: v2 test items, the text-guided pruners with the CLIP's text tower
    from jobs import eval_lvlm

    rows = eval_lvlm.main(["--world", "v2", "--model", str(tmp_path / "lvlm"), "--clip", clip_dir, "--per-type", "1",
                           "--methods", "prumerge_plus,cdpruner", "--rates", "0.75", "--threads", "1", "--markdown", str(tmp_path / "t.md")])
    assert [(r["method"], r["kept"], r["caption"]) for r in rows] == [
        ("none", 144, False), ("prumerge_plus", 36, False), ("cdpruner", 36, False), ("prumerge_plus", 18, True)]
    assert all(0 <= r["all"] <= 100 and r["se"] >= 0 for r in rows) and "± " in (tmp_path / "t.md").read_text()
    assert rows[0]["mflops"] > rows[1]["mflops"] and rows[0]["drop_se"] == 0.0
    # --split val (choosing among checkpoints without touching test); --methods "": full tokens + oracle row only
    val_rows = eval_lvlm.main(["--world", "v2", "--model", str(tmp_path / "lvlm"), "--split", "val", "--methods", "",
                               "--per-type", "1", "--threads", "1"])
    assert [(r["method"], r["caption"]) for r in val_rows] == [("none", False), ("prumerge_plus", True)]
    assert {it.id.split("-")[0] for it in eval_lvlm.eval_items(7, 2, "val")} == {"val"}
    covered = eval_lvlm.main(["--world", "v2", "--model", str(tmp_path / "lvlm"), "--clip", clip_dir, "--coverage",
                              "--per-type", "2", "--methods", "random,divprune", "--rates", "0.5,0.9375", "--threads", "1"])
    assert [(r["method"], r["kept"]) for r in covered] == [("random", 72), ("random", 9), ("divprune", 72), ("divprune", 9)]
    assert all(0 <= r["all"] <= 100 for r in covered) and covered[0]["all"] >= covered[1]["all"]
    with pytest.raises(ValueError, match="inside the LLM"):
        eval_lvlm.main(["--world", "v2", "--model", str(tmp_path / "lvlm"), "--coverage", "--methods", "fastv"])
    assert eval_lvlm.world is eval_lvlm.shapes  # main() put the module's world back
    proc = AutoProcessor.from_pretrained(str(tmp_path / "lvlm"))
    prompt = "USER: <image>\nWhat row is the red circle in? ASSISTANT:"
    for size in ((1, 1), (640, 480)):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == V.N_VISUAL
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] > inputs["input_ids"].shape[1]
