"""jobs/diagnose_shape_reading.py on the shipped Shapes v2 LVLM: a few scenes and val items."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from jobs import diagnose_shape_reading as D  # noqa: E402


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    readable = (x @ torch.randn(8, 4, generator=g)).argmax(-1)
    noise = torch.randint(0, 4, (2000,), generator=g)
    assert D.linear_probe(x, readable) > 0.9
    assert D.linear_probe(x, noise) < 0.45


def test_tower_probe_finds_colour_and_shape_in_the_feature_layer(tmp_path):
    out = D.main(["tower", "--scenes", "40", "--threads", "1", "--json", str(tmp_path / "t.json")])["result"]
    assert out["objects"] >= 40 * 20
    # the shipped tower was trained with per-patch colour and shape probes: both are linear in its tokens
    assert out["color"]["mean of 4"] >= 0.9
    assert out["shape"]["mean of 4"] >= 3 * out["chance"]["shape"]
    # and where each object is: what a spatial question reads once the object is found
    assert min(out["row"]["one patch (top-left)"], out["column"]["one patch (top-left)"]) >= 0.9
    assert (tmp_path / "t.json").exists()


def test_answers_of_the_shipped_lvlm_read_shape():
    out = D.main(["answers", "--qtype", "shape", "--n", "30", "--threads", "1"])["result"]
    assert out["n"] == 30 and out["example_question"].startswith("What shape is in cell")
    assert out["accuracy"] >= 0.8
    assert len(out["predicted"]) >= 4  # not one constant answer
    assert sum(c for _, c in out["truth"]) == 30


def test_layers_find_shape_at_the_shipped_lvlms_cell_word_and_answer():
    """The shipped LVLM gathers its object's shape at the cell word from layer 1 on and carries it to the answer
    (a from-scratch one that answers one constant word reads neither: docs/reports/.../shape_reading); in a
    spatial question its shape word searches the image for the named colour and shape and reads the row."""
    out = D.main(["layers", "--n", "150", "--threads", "1", "--qtypes", "shape,color,spatial"])["result"]
    for qtype in ("shape", "color"):
        rows = out[qtype]["layers"]
        assert out[qtype]["items"] == 150 and len(rows) == 7  # the embeddings + six decoder layers
        chance = out[qtype]["chance"]
        assert rows[0]["cell word"] < 2.5 * chance  # a word embedding knows nothing of the image
        assert rows[-1]["cell word"] >= 4 * chance and rows[-1]["answer position"] >= 4 * chance
    # per head: its first layer has one head that looks the object up and reads and writes its shape
    heads = out["shape"]["heads"]
    assert len(heads) == 6 and all(len(h["mass on the object"]) == 8 for h in heads)
    first = heads[0]
    lookup = max(range(8), key=lambda h: first["mass on the object"][h])
    assert first["mass on the object"][lookup] > 0.5
    assert min(first["reads"][lookup], first["writes"][lookup]) >= 3 * out["shape"]["chance"]
    # spatial: the row is nowhere in the question's words until some layer's head finds the object
    spatial = out["spatial"]
    assert spatial["chance"] == round(1 / 6, 4) and "heads" in spatial and "heads" not in out["color"]
    assert spatial["layers"][0]["shape word"] < 2 * spatial["chance"]
    assert spatial["layers"][-1]["answer position"] >= 4 * spatial["chance"]
    search = max(spatial["heads"], key=lambda h: max(h["mass on the object"]))
    head = max(range(8), key=lambda h: search["mass on the object"][h])
    assert search["mass on the object"][head] > 0.5 and search["reads"][head] >= 4 * spatial["chance"]


def test_tokens_probe_shape_and_row_on_the_visual_tokens_inside_the_llm():
    """What a search could match and read: the shipped LVLM's visual tokens keep their object's shape and row
    through every layer (a from-scratch model's do too: the search fails in the query-key match)."""
    out = D.main(["tokens", "--scenes", "30", "--threads", "1"])["result"]
    assert out["objects"] >= 30 * 20 and len(out["layers"]) == 7
    for row in out["layers"]:
        assert row["shape (mean of 4)"] >= 3 * out["chance"]["shape"]
        assert row["row (one patch)"] >= 0.9
