"""Shapes-VQA: a procedural visual-question benchmark built so that visual-token pruning must hurt.

Design (chosen together with the proving-ground models):

* A 64x64 RGB image on a plain dark background, cut by the vision tower into an 8x8 grid of 8-pixel
  patches (64 visual tokens). Every object sits *inside one grid cell*, so each fact of the scene
  lives in exactly one visual token.
* Scenes are crowded (10-16 objects, more than a hard pruning budget of 8 tokens can keep) and every
  question is about one object or one small set of objects. Dropping that object's patch removes the
  answer from the image: pruning most tokens must hurt, and a one-line caption can put it back.
* Five question types, single-word answers: ``color`` (colour of the uniquely-shaped object),
  ``shape`` (shape of the uniquely-coloured object), ``count`` (how many objects of a shape),
  ``exist`` (is there a <colour> <shape>, yes/no balanced, POPE-style) and ``spatial`` (what shape is
  in row r, column c).
* Each item records its scene graph (JSON) so that caption targets ("the triangle is red.") and tests
  can be derived from it, and 10 VQAv2-style answers.
* Deterministic: item ``i`` of split ``s`` under seed ``S`` is drawn from ``numpy.random.default_rng(
  [S, split_index, i])``; the PNG encoder is deterministic. Splits are disjoint by construction: a
  scene belongs to the split its content hash selects (``hash % 10``: 0-7 train, 8 val, 9 test), and
  other scenes are redrawn.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 8
CELL = IMAGE_SIZE // GRID
MIN_OBJECTS, MAX_OBJECTS = 10, 16
BACKGROUND = (24, 24, 24)

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
QUESTION_TYPES = ("color", "shape", "count", "exist", "spatial")
SPLITS = ("train", "val", "test")
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
NUM_ANSWERS = 10
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    row: int  # 0-based grid row (top = 0)
    col: int  # 0-based grid column (left = 0)
    dx: int  # pixel offset of the shape inside its cell
    dy: int
    size: int  # bounding box edge in pixels


@dataclass(frozen=True)
class Item:
    """One benchmark row before encoding."""

    id: str
    objects: tuple[SceneObject, ...]
    question: str
    question_type: str
    answer: str
    target: tuple[int, ...]  # indices of the objects the answer depends on

    def scene_json(self) -> str:
        return json.dumps(
            {"image_size": IMAGE_SIZE, "grid": GRID, "objects": [asdict(o) for o in self.objects]},
            sort_keys=True,
        )


def scene_hash(objects: tuple[SceneObject, ...], salt: str = "") -> int:
    """Content hash that assigns a scene to its split (``salt``: another world's, so its splits differ)."""
    key = ";".join(f"{o.shape},{o.color},{o.row},{o.col}" for o in sorted(objects, key=lambda o: (o.row, o.col)))
    return int.from_bytes(hashlib.sha256((salt + key).encode()).digest()[:8], "big")


def sample_scene(
    rng: np.random.Generator, split: str, n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)
) -> tuple[SceneObject, ...]:
    """Draw ``n_objects[0]..n_objects[1]`` objects in distinct cells, redrawing until the scene hashes
    into ``split`` (training curricula pass smaller counts; the benchmark uses the default)."""
    buckets = _SPLIT_BUCKETS[split]
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        objects = []
        for cell in sorted(int(c) for c in cells):
            size = int(rng.integers(5, 7))
            objects.append(
                SceneObject(
                    shape=SHAPES[int(rng.integers(len(SHAPES)))],
                    color=COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))],
                    row=cell // GRID,
                    col=cell % GRID,
                    dx=int(rng.integers(0, CELL - size + 1)),
                    dy=int(rng.integers(0, CELL - size + 1)),
                    size=size,
                )
            )
        objects = tuple(objects)
        if scene_hash(objects) % 10 in buckets:
            return objects


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, rgb: tuple[int, int, int], *, cell: int = CELL,
                bold: bool = False) -> None:
    """Draw ``obj`` in its ``cell``-pixel cell; ``bold`` (v2's larger shapes): squares inset by a pixel,
    3-px cross bars and 2-px rings."""
    x0 = obj.col * cell + obj.dx
    y0 = obj.row * cell + obj.dy
    s = obj.size - 1
    x1, y1 = x0 + s, y0 + s
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    inset, bar = (1, 1.5) if bold else (0, 0.5)
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif obj.shape == "square":
        draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif obj.shape == "cross":
        draw.rectangle([x0, cy - bar, x1, cy + bar], fill=rgb)
        draw.rectangle([cx - bar, y0, cx + bar, y1], fill=rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif obj.shape == "ring":
        draw.ellipse([x0, y0, x1, y1], outline=rgb, width=2 if bold else 1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(obj.shape)


def render(objects: tuple[SceneObject, ...]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj, COLORS[obj.color])
    return image


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def ask(objects: tuple[SceneObject, ...], qtype: str, rng: np.random.Generator, exist_answer: str | None = None):
    """Return (question, answer, target object indices) or None if this scene cannot ask ``qtype``.

    ``exist_answer`` ("yes"/"no") fixes the answer of an ``exist`` question (``make_item`` alternates it
    so that every split is exactly balanced, as in POPE); by default a fair coin decides.
    """
    if qtype == "color":
        unique = [i for i, o in enumerate(objects) if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:
            return None
        i = unique[int(rng.integers(len(unique)))]
        return f"What color is the {objects[i].shape}?", objects[i].color, (i,)
    if qtype == "shape":
        unique = [i for i, o in enumerate(objects) if sum(p.color == o.color for p in objects) == 1]
        if not unique:
            return None
        i = unique[int(rng.integers(len(unique)))]
        return f"What shape is the {objects[i].color} object?", objects[i].shape, (i,)
    if qtype == "count":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        hits = tuple(i for i, o in enumerate(objects) if o.shape == shape)
        return f"How many {plural(shape)} are there?", str(len(hits)), hits
    if qtype == "exist":
        present = {(o.color, o.shape) for o in objects}
        coin = rng.random() < 0.5  # drawn either way: items whose coin agrees stay as before
        if exist_answer not in (None, "yes", "no"):
            raise ValueError(f"exist_answer must be 'yes', 'no' or None, not {exist_answer!r}")
        if (exist_answer == "yes") if exist_answer is not None else coin:
            i = int(rng.integers(len(objects)))
            o = objects[i]
            return f"Is there a {o.color} {o.shape}?", "yes", (i,)
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"Is there a {c} {s}?", "no", ()
    if qtype == "spatial":
        i = int(rng.integers(len(objects)))
        o = objects[i]
        return f"What shape is in row {o.row + 1}, column {o.col + 1}?", o.shape, (i,)
    raise ValueError(f"unknown question type {qtype!r}")


def fact(objects: tuple[SceneObject, ...], qtype: str, question: str, target: tuple[int, ...]) -> str:
    """The short scene fact that answers a question: the target text of a perfect caption."""
    if qtype == "count":
        shape = question.split("How many ", 1)[1].split(" are", 1)[0]
        n = len(target)
        return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {shape}."
    if qtype == "exist" and not target:
        c, s = question[len("Is there a "):-1].split(" ", 1)
        return f"there is no {c} {s}."
    o = objects[target[0]]
    if qtype == "spatial":
        return f"the {o.shape} in row {o.row + 1}, column {o.col + 1} is {o.color}."
    return f"the {o.shape} is {o.color}."


def parse_lo_hi(text: str) -> tuple[int, int]:
    """``"LO-HI"`` or ``"N"`` -> (lo, hi), as the jobs' command lines write ranges (object counts, budgets)."""
    lo, _, hi = text.strip().partition("-")
    return int(lo), int(hi or lo)


def make_item(
    seed: int, split: str, index: int, qtype: str | None = None,
    n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
) -> Item:
    """Item ``index`` of ``split`` under ``seed`` (``n_objects``: other scene sizes, for diagnostics)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        objects = sample_scene(rng, split, n_objects)
        q_type = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
        # exist questions alternate yes/no: exactly balanced over any run of consecutive items
        nth_of_type = index if qtype else index // len(QUESTION_TYPES)
        asked = ask(objects, q_type, rng, exist_answer="yes" if nth_of_type % 2 == 0 else "no")
        if asked is not None:
            question, answer, target = asked
            return Item(f"{split}-{seed}-{index:07d}", objects, question, q_type, answer, target)


def item_row(item: Item) -> dict:
    """An input-contract row (see pipeline.schema.INPUT_SCHEMA) for one item."""
    return {
        "id": item.id,
        "image": encode_png(render(item.objects)),
        "question": item.question,
        "answers": [item.answer] * NUM_ANSWERS,
        "question_type": item.question_type,
        "scene": item.scene_json(),
        "fact": fact(item.objects, item.question_type, item.question, item.target),
    }


def patch_index(obj: SceneObject) -> int:
    """Index of the visual token (row-major patch) that holds ``obj``."""
    return obj.row * GRID + obj.col


# The interface both worlds share (pipeline.worlds): object positions range over CELLS x CELLS, an object
# covers ``patch_indices(obj)``, ``render_item`` draws an item's image.
CELLS = GRID  # one object per patch


def patch_indices(obj: SceneObject) -> tuple[int, ...]:
    """The visual tokens that hold ``obj``: its one patch."""
    return (patch_index(obj),)


def render_item(item: Item) -> Image.Image:
    return render(item.objects)
