"""Shapes-VQA v2: a procedural VQA world with redundancy like real images (proving ground v2).

Why a second world: in v1 (``pipeline/shapes.py``) every object lives in one 8-px patch, so every pruned
patch is a lost fact and plain pruners lose 50+ points already at 50% pruning, where LLaVA-1.5-7B loses a
few. Here the information is spread out the way it is in photos:

* A 96x96 RGB image cut by the vision tower into a 12x12 grid of 8-px patches (144 visual tokens, LLaVA's
  336/14 = 24x24 grid scaled down). Objects sit in a coarse 6x6 grid of 16-px *cells*; each object is
  11-15 px and covers the 2x2 patches of its cell, so half of an object's patches usually still show it.
* The background is a low-contrast texture (stripes, checks or dots, one per scene) that repeats:
  dropping background patches loses nothing.
* Scenes are crowded: 20-28 objects, more than a 87.5% budget (18 of 144 tokens) can keep one patch
  of, fewer than the 50% budget (72) can: moderate pruning should be nearly free, hard pruning must lose facts.
* Five question types, single-word answers, each about one object or a small set:
  ``color`` (colour of the object in a named cell), ``shape`` (shape in a named cell), ``count``
  (how many <colour> objects), ``exist`` (is there a <colour> <shape>, POPE-balanced yes/no) and
  ``spatial`` (which row is the <colour> <shape> in, for a colour-shape pair that occurs once).
* A cell is named by one word, ``cell <column letter><row digit>`` ("cell c4": column 3, row 4; see
  ``cell_name``), so an LLM's query for a cell is one token embedding. Named by two words ("row 3, column 4",
  then "row 3, column four") a 6-layer LLM trained with shuffled visual tokens found the named row by content
  but never the cell, the conjunction of the two words (docs/notes/proving-ground-v2.md, sessions 5 and 6).
* One caption form per object, ``the <colour> <shape> is in cell c4.``: the fact ACCM's caption must
  put back, and the text the CLIP's text tower is trained on.
* Deterministic and split-disjoint exactly like v1: item ``i`` of split ``s`` under seed ``S`` is drawn from
  ``numpy.random.default_rng([S, split_index, i])``; a scene belongs to the split its content hash selects.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline import shapes as _v1
from pipeline.shapes import (  # noqa: F401 - SceneObject is this world's too (row/col: the 6x6 cell)
    COLOR_NAMES,
    COLORS,
    NUM_ANSWERS,
    NUMBER_WORDS,
    SHAPES,
    SPLITS,
    SceneObject,
    encode_png,
    plural,
)

IMAGE_SIZE = 96
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 12x12 patches: the visual tokens
CELLS = 6  # 6x6 object cells of 16 px: each object covers 2x2 patches
CELL = IMAGE_SIZE // CELLS
ROW_ANSWERS = tuple(str(r + 1) for r in range(CELLS))  # a spatial question's answer: the object's row
MIN_OBJECTS, MAX_OBJECTS = 20, 28
QUESTION_TYPES = ("color", "shape", "count", "exist", "spatial")
TEXTURES = ("stripes", "checks", "dots")
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}


@dataclass(frozen=True)
class Background:
    texture: str
    level: int  # base grey level
    amplitude: int  # texture contrast in grey levels
    period: int  # texture period in pixels


@dataclass(frozen=True)
class Item:
    """One benchmark row before encoding."""

    id: str
    objects: tuple[SceneObject, ...]
    background: Background
    question: str
    question_type: str
    answer: str
    target: tuple[int, ...]  # indices of the objects the answer depends on

    def scene_json(self) -> str:
        return json.dumps(
            {"world": "shapes_v2", "image_size": IMAGE_SIZE, "grid": GRID, "cells": CELLS,
             "background": asdict(self.background), "objects": [asdict(o) for o in self.objects]},
            sort_keys=True,
        )


def scene_hash(objects: tuple[SceneObject, ...]) -> int:
    return _v1.scene_hash(objects, salt="v2|")


def sample_background(rng: np.random.Generator) -> Background:
    return Background(
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        level=int(rng.integers(18, 42)),
        amplitude=int(rng.integers(6, 14)),
        period=int(rng.integers(3, 7)),
    )


def sample_scene(
    rng: np.random.Generator, split: str, n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)
) -> tuple[SceneObject, ...]:
    """Draw ``n_objects[0]..n_objects[1]`` objects in distinct cells, redrawing until the scene hashes into
    ``split`` (training curricula may pass smaller counts; the benchmark uses the default)."""
    buckets = _SPLIT_BUCKETS[split]
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        cells = rng.choice(CELLS * CELLS, size=n, replace=False)
        objects = []
        for cell in sorted(int(c) for c in cells):
            size = int(rng.integers(11, 16))
            objects.append(SceneObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                color=COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))],
                row=cell // CELLS, col=cell % CELLS,
                dx=int(rng.integers(0, CELL - size + 1)), dy=int(rng.integers(0, CELL - size + 1)),
                size=size,
            ))
        objects = tuple(objects)
        if scene_hash(objects) % 10 in buckets:
            return objects


def _texture(bg: Background) -> np.ndarray:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if bg.texture == "stripes":
        on = ((x + y) // bg.period) % 2 == 0
    elif bg.texture == "checks":
        on = ((x // bg.period) + (y // bg.period)) % 2 == 0
    else:  # dots
        on = (x % (bg.period + 2) == 0) & (y % (bg.period + 2) == 0)
    grey = np.where(on, bg.level + bg.amplitude, bg.level).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def render(objects: tuple[SceneObject, ...], background: Background) -> Image.Image:
    image = Image.fromarray(_texture(background), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _v1._draw_shape(draw, obj, COLORS[obj.color], cell=CELL, bold=True)
    return image


def render_item(item: Item) -> Image.Image:
    return render(item.objects, item.background)


COLUMN_LETTERS = "abcdef"  # a cell word is its column's letter and its row's digit, spreadsheet style


def cell_word(row: int, col: int) -> str:
    return f"{COLUMN_LETTERS[col]}{row + 1}"


CELL_WORDS = tuple(cell_word(r, c) for r in range(CELLS) for c in range(CELLS))


def cell_name(obj: SceneObject) -> str:
    """How questions and captions name an object's cell: ``cell`` and one word, ``c4`` = column 3, row 4."""
    return f"cell {cell_word(obj.row, obj.col)}"


def cell_of(word: str) -> tuple[int, int] | None:
    """(row, column) of a cell word, None for any other word."""
    if len(word) == 2 and word[0] in COLUMN_LETTERS and word[1].isdigit() and 1 <= int(word[1]) <= CELLS:
        return int(word[1]) - 1, COLUMN_LETTERS.index(word[0])
    return None


def cell_word_parts(word: str) -> tuple[str, ...]:
    """The words an older vocabulary named this cell with (row digit, column digit, column number word): what a
    grown embedding table starts a new cell word from (``actors.vocab_growth``)."""
    row, col = cell_of(word)
    return str(row + 1), str(col + 1), NUMBER_WORDS[col + 1]


def caption(obj: SceneObject) -> str:
    """The one caption form of an object: what a perfect ACCM caption says about it."""
    return f"the {obj.color} {obj.shape} is in {cell_name(obj)}."


def ask(objects: tuple[SceneObject, ...], qtype: str, rng: np.random.Generator, exist_answer: str | None = None):
    """Return (question, answer, target object indices) or None if this scene cannot ask ``qtype``.

    ``exist_answer`` ("yes"/"no") fixes an ``exist`` answer (``make_item`` alternates it, as POPE balances).
    """
    if qtype in ("color", "shape"):
        i = int(rng.integers(len(objects)))
        o = objects[i]
        if qtype == "color":
            return f"What color is the object in {cell_name(o)}?", o.color, (i,)
        return f"What shape is in {cell_name(o)}?", o.shape, (i,)
    if qtype == "count":
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        hits = tuple(i for i, o in enumerate(objects) if o.color == color)
        return f"How many {color} objects are there?", str(len(hits)), hits
    if qtype == "exist":
        if exist_answer not in (None, "yes", "no"):
            raise ValueError(f"exist_answer must be 'yes', 'no' or None, not {exist_answer!r}")
        coin = rng.random() < 0.5
        if (exist_answer == "yes") if exist_answer is not None else coin:
            i = int(rng.integers(len(objects)))
            return f"Is there a {objects[i].color} {objects[i].shape}?", "yes", (i,)
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"Is there a {c} {s}?", "no", ()
    if qtype == "spatial":
        pairs = [(o.color, o.shape) for o in objects]
        unique = [i for i, p in enumerate(pairs) if pairs.count(p) == 1]
        if not unique:
            return None
        i = unique[int(rng.integers(len(unique)))]
        return f"What row is the {objects[i].color} {objects[i].shape} in?", ROW_ANSWERS[objects[i].row], (i,)
    raise ValueError(f"unknown question type {qtype!r}")


def fact(objects: tuple[SceneObject, ...], qtype: str, question: str, target: tuple[int, ...]) -> str:
    """The short scene fact that answers a question: the target text of a perfect caption."""
    if qtype == "count":
        color = question.split("How many ", 1)[1].split(" ", 1)[0]
        n = len(target)
        number = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
        return f"there {'is' if n == 1 else 'are'} {number} {color} {'object' if n == 1 else 'objects'}."
    if qtype == "exist" and not target:
        c, s = question[len("Is there a "):-1].split(" ", 1)
        return f"there is no {c} {s}."
    return caption(objects[target[0]])


def make_item(
    seed: int, split: str, index: int, qtype: str | None = None,
    n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
) -> Item:
    """Item ``index`` of ``split`` under ``seed`` (``n_objects``: other scene sizes, for curricula and diagnostics)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        objects = sample_scene(rng, split, n_objects)
        background = sample_background(rng)
        q_type = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
        nth_of_type = index if qtype else index // len(QUESTION_TYPES)
        asked = ask(objects, q_type, rng, exist_answer="yes" if nth_of_type % 2 == 0 else "no")
        if asked is not None:
            question, answer, target = asked
            return Item(f"v2-{split}-{seed}-{index:07d}", objects, background, question, q_type, answer, target)


def item_row(item: Item) -> dict:
    """An input-contract row (see pipeline.schema.INPUT_SCHEMA) for one item."""
    return {
        "id": item.id,
        "image": encode_png(render(item.objects, item.background)),
        "question": item.question,
        "answers": [item.answer] * NUM_ANSWERS,
        "question_type": item.question_type,
        "scene": item.scene_json(),
        "fact": fact(item.objects, item.question_type, item.question, item.target),
    }


def patch_indices(obj: SceneObject) -> tuple[int, ...]:
    """Row-major indices of the 2x2 visual tokens (patches) that hold ``obj``."""
    per = CELL // PATCH
    return tuple((obj.row * per + r) * GRID + obj.col * per + c for r in range(per) for c in range(per))


def vocabulary_words() -> list[str]:
    """Every word the v2 questions, answers and facts use (tokenizers add their specials and punctuation)."""
    words = ["What", "How", "Is", "color", "shape", "is", "the", "object", "objects", "many", "are", "there",
             "a", "in", "row", "column", "no", "yes"]
    words += list(COLOR_NAMES) + list(SHAPES) + [plural(s) for s in SHAPES]
    words += list(NUMBER_WORDS) + [str(i) for i in range(MAX_OBJECTS + 1)]
    words += ["cell", *CELL_WORDS]  # last: a vocabulary saved before them is a prefix of this one
    return list(dict.fromkeys(words))
