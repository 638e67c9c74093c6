"""jobs/diagnose_captioner.py: each diagnostic on a tiny random LVLM + caption model returns well-formed numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(patch-prefix caption model, plain caption model, engine, folder of the patch-prefix one)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from actors.captioner import CaptionModel, build_caption_model
    from actors.engine import LlavaEngine
    from actors.tiny import build_tiny_llava

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diag")
    build_tiny_llava(root / "lvlm", vision_hidden=32, text_hidden=32, heads=2, kv_heads=1)
    engine = LlavaEngine.from_pretrained(str(root / "lvlm"))
    loaded = {}
    for patch_prefix in (True, False):
        cap = build_caption_model(engine.tokenizer, feature_dim=engine.config.vision_config.hidden_size, hidden=32,
                                  decoder_layers=2, decoder_heads=2, prefix_len=2, patch_prefix=patch_prefix,
                                  mapper_layers=1, mapper_heads=2, max_caption_tokens=8)
        cap.save_pretrained(root / f"cap-{patch_prefix}")
        loaded[patch_prefix] = CaptionModel.from_pretrained(root / f"cap-{patch_prefix}")
    yield loaded[True], loaded[False], engine, root
    torch.set_num_threads(threads)


def _rate(v) -> bool:
    return v is not None and 0.0 <= v <= 1.0


def test_by_objects_rates_per_object_range_and_type(models):
    from jobs.diagnose_captioner import by_objects
    from pipeline import shapes

    cap, _, engine, _ = models
    result = by_objects(cap, engine, n=3, ranges=[(1, 1), (10, 16)])
    assert list(result["exact_match"]) == ["1", "10-16"]
    for row in result["exact_match"].values():
        assert set(row) == {*shapes.QUESTION_TYPES, "all"} and all(_rate(v) for v in row.values())
    json.dumps(result)


def test_errors_per_question_type_on_visible_items(models):
    from jobs.diagnose_captioner import errors
    from pipeline import shapes

    cap, _, engine, _ = models
    result = errors(cap, engine, n=20)
    assert result["per_type"] and set(result["per_type"]) <= set(shapes.QUESTION_TYPES)
    for row in result["per_type"].values():
        assert row["n"] > 0 and _rate(row["exact_match"])
    assert result["all"]["n"] == sum(r["n"] for r in result["per_type"].values()) <= 20
    for e in result["examples"]:
        assert e["qtype"] in shapes.QUESTION_TYPES and e["caption"] != e["fact"]


def test_attention_on_the_colour_word(models):
    from jobs.diagnose_captioner import attention

    cap, plain, engine, _ = models
    result = attention(cap, engine, n=16)
    assert 0 < result["items"] <= 16 and result["argmax_on_object"] <= result["items"]
    for key in ("target_mass", "argmax_is_target", "colour_word_right"):
        assert _rate(result[key]), key
    assert result["reads_attended"] is None or _rate(result["reads_attended"])
    with pytest.raises(ValueError, match="patch_prefix"):
        attention(plain, engine, n=4)


def test_slot_probe_per_layer_on_disjoint_items(models):
    from jobs.diagnose_captioner import slot_probe

    cap, plain, engine, _ = models
    result = slot_probe(cap, engine, n=20, steps=30)
    assert list(result["colour_accuracy"]) == ["raw", "mapper", "decoder_1", "decoder_2"]
    assert all(_rate(v) for v in result["colour_accuracy"].values()) and _rate(result["chance"])
    assert result["train_objects"] > 0 and result["test_objects"] > 0
    assert result["train_items"][1] <= result["test_items"][0]  # disjoint val index ranges
    with pytest.raises(ValueError, match="patch_prefix"):
        slot_probe(plain, engine, n=4)


def test_cli_help():
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "jobs/diagnose_captioner.py", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "slot-probe" in proc.stdout and "--captioner" in proc.stdout


def test_main_writes_json(models, tmp_path, capsys):
    from jobs.diagnose_captioner import main

    _, _, _, root = models
    out = tmp_path / "diag" / "errors.json"
    result = main(["errors", "--captioner", str(root / "cap-True"), "--lvlm", str(root / "lvlm"), "--n", "10",
                   "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "exact match" in capsys.readouterr().out
