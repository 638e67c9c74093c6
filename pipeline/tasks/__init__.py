"""Benchmark tasks: one module per benchmark, each fixing its prompt, its answer length and its official metric.

``--task NAME`` picks a module here. A task module is plain Python (no Ray, no torch) and defines:

* ``NAME`` (str) and ``FORMATS`` (tuple of input formats it reads, ``pipeline.sources.FORMATS``);
* ``MAX_NEW_TOKENS`` (int): the generation length LLaVA's evaluation uses for it;
* ``HEADLINE`` / ``HEADLINE_UNIT``: the key of ``aggregate``'s result the papers' tables show, and its unit;
* optionally ``LLAVA_QUESTION_ID``: the field exported as LLaVA's ``question_id`` (default ``question_id``);
* ``EXTRA_FIELDS`` (``pyarrow.Schema``): the benchmark's own ids and fields kept in every output row (typed as
  the benchmark ships them, e.g. ``question_id`` int for POPE, string for GQA), never clashing with
  ``pipeline.schema`` column names;
* ``load_truth(annotations: str | None, read: Reader) -> Any``: the ground truth as the benchmark ships it
  (a file or a folder, read through ``read``), as a picklable lookup; ``None`` where the input rows carry
  their answers. A missing ``--annotations`` where the format needs one raises ``ValueError``;
* ``to_row(record: dict, fmt: str, truth: Any, index: int) -> dict``: one raw input record (a JSONL object,
  a TSV/CSV row as strings, a Parquet row) -> one row of the input contract: ``id`` (unique string),
  ``question`` (the full text the LVLM reads: LLaVA's answer-format line and option layout included;
  ACCM's side path reads its first line), ``answers`` (list of strings, or None: no ground truth ->
  unscored), ``question_type`` (the per-category key of the summary), one image source (``image`` bytes,
  ``image_b64`` base64 text, or ``image_file`` relative to ``--image-root``), optionally ``input_error`` (a
  per-row error such as an unknown option letter) and the ``EXTRA_FIELDS`` values;
* ``score(prediction: str, answers: list[str]) -> float | None``: the per-item score as the official script
  counts it (None where the metric is only defined over the whole set, e.g. CIDEr);
* ``aggregate(rows: list[dict]) -> dict``: the official aggregate(s) over the scored output rows (each row
  has ``id``, ``prediction``, ``answers``, ``score``, ``question_type`` and the ``EXTRA_FIELDS``); rows with
  an error are not passed in.

``Reader`` is ``(url) -> bytes`` plus ``.list(url) -> list[str]`` (paths, file:// or s3://).
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("vqav2", "textvqa", "gqa", "pope", "mme", "mmbench", "seed", "scienceqa", "mmvp", "flickr30k")


def get(name: str) -> ModuleType:
    """The task module ``name`` (``pipeline.tasks.<name>``)."""
    if name not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return importlib.import_module(f"pipeline.tasks.{name}")
