"""The Shapes-VQA worlds by name: ``v1`` (pipeline/shapes.py, one object per patch) and ``v2``
(pipeline/shapes_v2.py, objects over 2x2 patches on a textured background).

Both modules share the interface the jobs use: ``make_item``, ``fact``, ``render_item``, ``patch_indices``,
``item_row``, ``GRID`` (patches per side), ``CELLS`` (object positions per side), ``QUESTION_TYPES``,
``MIN_OBJECTS``/``MAX_OBJECTS``, ``COLOR_NAMES``, ``SHAPES``, ``NUM_ANSWERS``."""

from __future__ import annotations

from types import ModuleType

from pipeline import shapes, shapes_v2

WORLDS: dict[str, ModuleType] = {"v1": shapes, "v2": shapes_v2}
