"""actors/accm_batches.py on the shipped Shapes v2 models: the count facts a caption model is taught."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from actors import accm_batches as B  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402

REPO = B.__file__.rsplit("/actors/", 1)[0]
COUNT_ITEMS = [5 * i + world.QUESTION_TYPES.index("count") for i in range(12)]


@pytest.fixture(scope="module")
def engine():
    from actors.engine import LlavaEngine

    return LlavaEngine.from_pretrained(f"{REPO}/models/shapes_v2/lvlm", clip_text_url=f"{REPO}/models/shapes_v2/clip")


def test_list_count_facts_name_the_wholly_discarded_counted_objects(engine):
    total = B.make_batch(engine, 0, "val", COUNT_ITEMS, 9, world=world, features="projected")
    listed = B.make_batch(engine, 0, "val", COUNT_ITEMS, 9, world=world, features="projected", count_facts="list")
    assert all(listed["fact_visible"])  # a list of what the LVLM cannot see can always be said
    spoke = 0
    for item, dropped, fact, old, slots in zip(listed["items"], listed["discarded_indices"], listed["facts"],
                                               total["facts"], listed["target_slots"], strict=True):
        assert old.startswith("there ")  # the total form, unchanged by default
        gone = set(dropped)
        expect = [o for o in item.target if all(p in gone for p in world.patch_indices(item.objects[o]))]
        if not expect:
            assert fact == B.ABSTAIN_CAPTION and slots == []
            continue
        spoke += 1
        assert fact == " ".join(world.caption(item.objects[o]) for o in expect)
        assert len(slots) == 4 * len(expect)  # every patch of a wholly discarded object is a discarded slot
        assert sorted(dropped[s] for s in slots) == sorted(p for o in expect for p in world.patch_indices(item.objects[o]))
    assert spoke > 0


def test_count_facts_must_be_known(engine):
    with pytest.raises(ValueError, match="count_facts"):
        B.make_batch(engine, 0, "val", COUNT_ITEMS[:1], 9, world=world, features="projected", count_facts="some")


def test_weighted_indices_draw_question_types_by_weight():
    idx = B.weighted_indices(1000, 700, {"count": 3}, seed=0, world=world)
    assert len(set(idx)) == 700
    types = [world.make_item(0, "train", i).question_type for i in idx[:40]]
    assert types == [world.QUESTION_TYPES[i % 5] for i in idx[:40]]
    share = sum(world.QUESTION_TYPES[i % 5] == "count" for i in idx) / len(idx)
    assert abs(share - 3 / 7) < 0.05  # count weighted 3 against 1 for each of the other four
    assert B.weighted_indices(1000, 700, {"count": 3}, seed=0, world=world) == idx  # a function of (seed, first)
    with pytest.raises(ValueError, match="unknown"):
        B.weighted_indices(0, 4, {"colour": 2}, seed=0, world=world)
