"""Shapes-VQA generator properties the benchmark's claims rest on (checked from the stored rows)."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline import shapes
from pipeline.shapes import CELL, GRID, item_row, make_item

N = 200  # items per split for the statistical checks


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: [item_row(make_item(5, split, i)) for i in range(N)] for split in shapes.SPLITS}


def scene_objects(row: dict) -> list[dict]:
    return json.loads(row["scene"])["objects"]


def scene_key(row: dict) -> tuple:
    return tuple(sorted((o["row"], o["col"], o["shape"], o["color"]) for o in scene_objects(row)))


def test_deterministic_bytes():
    a = [item_row(make_item(11, "train", i)) for i in range(5)]
    b = [item_row(make_item(11, "train", i)) for i in range(5)]
    assert a == b
    c = [item_row(make_item(12, "train", i)) for i in range(5)]
    assert all(x["image"] != y["image"] for x, y in zip(a, c, strict=True))


def test_splits_are_disjoint(rows):
    keys = {split: {scene_key(r) for r in rs} for split, rs in rows.items()}
    assert keys["train"].isdisjoint(keys["val"])
    assert keys["train"].isdisjoint(keys["test"])
    assert keys["val"].isdisjoint(keys["test"])
    # and by construction: every scene hashes into its split's bucket
    for split, rs in rows.items():
        for r in rs[:50]:
            objs = tuple(shapes.SceneObject(**o) for o in scene_objects(r))
            assert shapes.scene_hash(objs) % 10 in shapes._SPLIT_BUCKETS[split]


def test_question_types_present_and_balanced(rows):
    for rs in rows.values():
        counts = Counter(r["question_type"] for r in rs)
        assert set(counts) == set(shapes.QUESTION_TYPES)
        assert min(counts.values()) >= N // len(shapes.QUESTION_TYPES) - 1


def test_exist_questions_are_balanced_yes_no(rows):
    # POPE-style: exactly half yes over consecutive exist questions, in the default type cycle ...
    for rs in rows.values():
        answers = Counter(r["answers"][0] for r in rs if r["question_type"] == "exist")
        assert answers["yes"] == answers["no"] == N // len(shapes.QUESTION_TYPES) // 2
    # ... and when the type is forced
    answers = Counter(make_item(3, "train", i, qtype="exist").answer for i in range(100))
    assert answers == {"yes": 50, "no": 50}
    # a bare ask() still flips a fair coin
    rng = np.random.default_rng(0)
    scene = shapes.sample_scene(rng, "train")
    coin = Counter(shapes.ask(scene, "exist", rng)[1] for _ in range(400))
    assert 0.42 < coin["yes"] / 400 < 0.58


def solve(question: str, qtype: str, objects: list[dict]) -> str:
    """An independent reading of the scene graph: the answer each question template asks for."""
    if qtype == "color":
        shape = question.removeprefix("What color is the ").removesuffix("?")
        hits = [o for o in objects if o["shape"] == shape]
        assert len(hits) == 1, "colour questions must name a unique shape"
        return hits[0]["color"]
    if qtype == "shape":
        color = question.removeprefix("What shape is the ").removesuffix(" object?")
        hits = [o for o in objects if o["color"] == color]
        assert len(hits) == 1, "shape questions must name a unique colour"
        return hits[0]["shape"]
    if qtype == "count":
        word = question.removeprefix("How many ").removesuffix(" are there?")
        shape = next(s for s in shapes.SHAPES if shapes.plural(s) == word)
        return str(sum(o["shape"] == shape for o in objects))
    if qtype == "exist":
        color, shape = question.removeprefix("Is there a ").removesuffix("?").split(" ")
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in objects) else "no"
    if qtype == "spatial":
        r, c = question.removeprefix("What shape is in row ").removesuffix("?").split(", column ")
        hits = [o for o in objects if o["row"] == int(r) - 1 and o["col"] == int(c) - 1]
        assert len(hits) == 1
        return hits[0]["shape"]
    raise AssertionError(qtype)


def test_answers_follow_from_the_scene_graph(rows):
    for rs in rows.values():
        for r in rs:
            answer = solve(r["question"], r["question_type"], scene_objects(r))
            assert r["answers"] == [answer] * shapes.NUM_ANSWERS, r["id"]
            # the fact (a perfect caption) carries the answer
            if r["question_type"] == "count":
                n = int(answer)
                assert (shapes.NUMBER_WORDS[n] if n < len(shapes.NUMBER_WORDS) else answer) in r["fact"]
            elif r["question_type"] != "exist":
                assert answer in r["fact"]
            else:
                assert ("no " in r["fact"]) == (answer == "no")


def test_scene_layout_one_object_per_cell(rows):
    for r in rows["test"]:
        objs = scene_objects(r)
        assert shapes.MIN_OBJECTS <= len(objs) <= shapes.MAX_OBJECTS
        assert len({(o["row"], o["col"]) for o in objs}) == len(objs)


def test_every_object_lies_inside_its_patch(rows):
    """Drawn alone, every object's pixels stay in its own 8x8 cell, and the full image is empty elsewhere."""
    background = np.array(shapes.BACKGROUND)
    for r in rows["test"][:60]:
        objs = tuple(shapes.SceneObject(**o) for o in scene_objects(r))
        for obj in objs:
            mask = np.abs(np.asarray(shapes.render((obj,)), dtype=int) - background).sum(-1) > 0
            ys, xs = np.nonzero(mask)
            assert len(ys) > 0, obj
            assert ys.min() >= obj.row * CELL and ys.max() < (obj.row + 1) * CELL, obj
            assert xs.min() >= obj.col * CELL and xs.max() < (obj.col + 1) * CELL, obj
        image = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), dtype=int)
        assert image.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
        occupied = {shapes.patch_index(o) for o in objs}
        for cell in range(GRID * GRID):
            y, x = divmod(cell, GRID)
            patch = image[y * CELL:(y + 1) * CELL, x * CELL:(x + 1) * CELL]
            assert (np.abs(patch - background).sum() > 0) == (cell in occupied), (r["id"], cell)
