"""Shapes v2 generator properties the proving ground v2 rests on (checked from the stored rows)."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline import shapes_v2 as world
from pipeline.shapes_v2 import item_row, make_item

N = 150


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: [item_row(make_item(5, split, i)) for i in range(N)] for split in ("train", "val", "test")}


def objects_of(row: dict) -> list[dict]:
    return json.loads(row["scene"])["objects"]


def solve(question: str, qtype: str, objects: list[dict]) -> str:
    """An independent reading of the scene graph: the answer each question template asks for."""
    if qtype in ("color", "shape"):
        name = question.rstrip("?").split()[-1]  # "... in cell c4": column c (the third), row 4
        r, c = int(name[1]) - 1, "abcdef".index(name[0])
        (hit,) = [o for o in objects if (o["row"], o["col"]) == (r, c)]
        return hit[qtype]
    if qtype == "count":
        color = question.split()[2]
        return str(sum(o["color"] == color for o in objects))
    color, shape = question.rstrip("?").split()[-2:] if qtype == "exist" else question.split()[4:6]
    hits = [o for o in objects if (o["color"], o["shape"]) == (color, shape)]
    if qtype == "exist":
        return "yes" if hits else "no"
    assert len(hits) == 1, "spatial questions must name a colour-shape pair that occurs once"
    return str(hits[0]["row"] + 1)


def test_deterministic_and_seeded():
    a = [item_row(make_item(11, "train", i)) for i in range(4)]
    assert a == [item_row(make_item(11, "train", i)) for i in range(4)]
    assert all(x["image"] != y["image"] for x, y in zip(a, [item_row(make_item(12, "train", i)) for i in range(4)],
                                                        strict=True))


def test_splits_disjoint_and_answers_match_the_scene(rows):
    keys = {s: {tuple(sorted((o["row"], o["col"], o["shape"], o["color"]) for o in objects_of(r))) for r in rs}
            for s, rs in rows.items()}
    assert keys["train"].isdisjoint(keys["val"]) and keys["train"].isdisjoint(keys["test"])
    assert keys["val"].isdisjoint(keys["test"])
    for rs in rows.values():
        assert set(Counter(r["question_type"] for r in rs)) == set(world.QUESTION_TYPES)
        for r in rs:
            objs = objects_of(r)
            assert world.MIN_OBJECTS <= len(objs) <= world.MAX_OBJECTS
            assert len({(o["row"], o["col"]) for o in objs}) == len(objs)
            assert solve(r["question"], r["question_type"], objs) == r["answers"][0]
        exist = Counter(r["answers"][0] for r in rs if r["question_type"] == "exist")
        assert exist["yes"] == exist["no"]


def test_facts_state_the_answer(rows):
    for r in rows["test"]:
        fact, answer = r["fact"], r["answers"][0]
        if r["question_type"] == "count":
            n = int(answer)
            assert world.NUMBER_WORDS[n] in fact.split() and r["question"].split()[2] in fact
        elif r["question_type"] == "exist":
            color, shape = r["question"].rstrip("?").split()[-2:]
            assert fact.startswith("there is no " if answer == "no" else f"the {color} {shape} is in cell ")
        elif r["question_type"] == "spatial":
            assert fact.rstrip(".").split()[-1][1:] == answer  # the cell word's digit is its row
        else:
            assert answer in fact.split() and fact.endswith(".")


def test_objects_cover_two_by_two_patches_on_a_texture(rows):
    """The redundancy claim: each object's pixels lie in its cell's 4 patches and show in at least 3 of them,
    and the background is a texture (more than one grey level), not a flat colour."""
    for r in rows["val"][:40]:
        image = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
        assert image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        grey = image[(image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2]) & (image[..., 0] < 80)]
        assert len(np.unique(grey[:, 0])) >= 2
        for o in objects_of(r):
            rgb = np.asarray(world.COLORS[o["color"]])
            hit = np.all(image == rgb, axis=-1)
            y0, x0 = o["row"] * world.CELL, o["col"] * world.CELL
            inside = hit[y0:y0 + world.CELL, x0:x0 + world.CELL]
            patches = inside.reshape(2, world.PATCH, 2, world.PATCH).any(axis=(1, 3))
            assert patches.sum() >= 3, (o, patches)
            obj = world.SceneObject(**o)
            rows_, cols_ = zip(*[divmod(p, world.GRID) for p in world.patch_indices(obj)], strict=True)
            assert set(rows_) == {2 * o["row"], 2 * o["row"] + 1} and set(cols_) == {2 * o["col"], 2 * o["col"] + 1}
