"""The data contract: one definition of the input shards and of the output rows.

Every stage (readers, actors, writers, reports) imports its columns from here, so that a renamed or
retyped column fails in one place instead of silently producing nulls downstream.

Input shards (Parquet, one row per question):

* ``id`` string, unique across the dataset;
* exactly one image source per row: ``image`` binary (an encoded PNG/JPEG) or ``image_uri`` string
  (a path or URL that ``pipeline.storage`` resolves); a file may carry both columns, a row uses
  ``image`` when it is non-null;
* ``question`` string;
* ``answers`` list<string>, optional (VQAv2 style: 10 human answers); no answers -> no score;
* ``question_type`` string, optional;
* ``scene`` (JSON scene graph) and ``fact`` (the one-line fact that answers the question) are written
  by the Shapes-VQA generator, optional;
* any other column passes through to the output unchanged.

Output rows: ``id``, the passthrough input columns (never the image bytes), then ``OUTPUT_FIELDS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa


class SchemaError(ValueError):
    """An input file does not follow the contract; the message names column, file and expectation."""


# ----------------------------------------------------------------------------------------------------
# input

INPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("image_uri", pa.string()),
    pa.field("question", pa.string()),
    pa.field("answers", pa.list_(pa.string())),
    pa.field("question_type", pa.string()),
    pa.field("scene", pa.string()),
    pa.field("fact", pa.string()),
)
# The full input schema as the Shapes-VQA generator writes it (``image`` bytes, no ``image_uri``).
INPUT_SCHEMA = pa.schema([f for f in INPUT_FIELDS if f.name != "image_uri"])

REQUIRED_COLUMNS = ("id", "question")
IMAGE_COLUMNS = ("image", "image_uri")
OPTIONAL_COLUMNS = ("answers", "question_type", "scene", "fact")
# Columns the job consumes and does not copy to the output (the image bytes are large and decoded).
# (``input_error``: a benchmark record a task could not map, pipeline.sources; it becomes the row's ``error``.)
NOT_PASSED_THROUGH = ("image", "input_error")

_KNOWN = {f.name: f for f in INPUT_FIELDS}


def _string_like(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _binary_like(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _list_of_strings(t: pa.DataType) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
    return is_list and _string_like(t.value_type)


def _accepts(name: str, t: pa.DataType) -> bool:
    """Whether a column of type ``t`` satisfies the contract for ``name`` (large/view variants too)."""
    if name == "image":
        return _binary_like(t)
    if name == "answers":
        return _list_of_strings(t)
    return _string_like(t)


def _expected(name: str) -> str:
    return {"image": "binary (encoded PNG/JPEG bytes)", "answers": "list<string>"}.get(name, "string")


def validate_input_schema(schema: pa.Schema, file: str) -> None:
    """Raise ``SchemaError`` unless ``schema`` (of ``file``) follows the input contract.

    Checks presence of the required columns, that at least one image column exists, and the type of
    every known column. Unknown columns are accepted: they pass through.
    """
    names = set(schema.names)
    for name in REQUIRED_COLUMNS:
        if name not in names:
            raise SchemaError(
                f"{file}: missing required column {name!r}: expected a {_expected(name)} column "
                f"(found columns: {', '.join(schema.names) or 'none'})"
            )
    if not names.intersection(IMAGE_COLUMNS):
        raise SchemaError(
            f"{file}: missing image column: expected 'image' (binary, encoded PNG/JPEG) or 'image_uri' "
            f"(string) (found columns: {', '.join(schema.names) or 'none'})"
        )
    dupes = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if dupes:
        raise SchemaError(f"{file}: column {dupes[0]!r} appears more than once: expected unique column names")
    for field in schema:
        if field.name in _KNOWN and not _accepts(field.name, field.type):
            raise SchemaError(
                f"{file}: column {field.name!r} has type {field.type}: expected {_expected(field.name)}"
            )


def validate_unique_ids(ids: list[str | None], file: str) -> None:
    """Raise ``SchemaError`` on a null or repeated ``id`` (uniqueness is part of the contract)."""
    seen: set[str] = set()
    for i, value in enumerate(ids):
        if value is None:
            raise SchemaError(f"{file}: column 'id' is null in row {i}: expected a unique non-null string")
        if value in seen:
            raise SchemaError(f"{file}: column 'id' repeats {value!r} (row {i}): expected unique ids")
        seen.add(value)


def passthrough_schema(input_schema: pa.Schema) -> pa.Schema:
    """The input columns that are copied to the output, in input order (``id`` first, no image bytes)."""
    fields = [input_schema.field("id")] if "id" in input_schema.names else [pa.field("id", pa.string())]
    fields += [f for f in input_schema if f.name != "id" and f.name not in NOT_PASSED_THROUGH]
    return pa.schema(fields)


# ----------------------------------------------------------------------------------------------------
# output

FLOPS_COLUMNS = (
    "flops_vision",
    "flops_pruner",
    "flops_projector",
    "flops_captioner",
    "flops_selector",
    "flops_llm_prefill",
    "flops_llm_decode",
    "flops_total",
    "flops_reference_total",  # the same item without pruning or caption: the saving's denominator
)
LATENCY_COLUMNS = ("latency_decode_s", "latency_captioner_s", "latency_lvlm_s")
# the row's own LLM input length and the left padding its model batch added (summary: padding_fraction)
PREFILL_COLUMNS = ("prefill_tokens", "prefill_pad_tokens")

OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("prediction", pa.string()),
    pa.field("caption", pa.string()),  # the selected caption; null unless method == "accm"
    pa.field("caption_candidates", pa.list_(pa.string())),
    pa.field("selector_probs", pa.list_(pa.float32())),
    pa.field("method", pa.string()),
    pa.field("text_pick", pa.string()),  # prumerge_plus/accm with --clip: nearest | farthest; else null
    pa.field("pruner_options", pa.string()),  # the method's named choices (accm base, CDPruner sign, layers), or null
    pa.field("conv", pa.string()),  # the LVLM conversation format (actors.prompt.CONVERSATIONS)
    pa.field("answer_suffix", pa.string()),  # the answer-format line added to the question ('' for none)
    pa.field("keep_tokens", pa.int32()),
    pa.field("visual_tokens_total", pa.int32()),
    pa.field("score", pa.float64()),  # null when the row has no answers
    pa.field("error", pa.string()),  # null when the row was processed fine
    *(pa.field(name, pa.float64()) for name in FLOPS_COLUMNS),
    *(pa.field(name, pa.float64()) for name in LATENCY_COLUMNS),
    *(pa.field(name, pa.int32()) for name in PREFILL_COLUMNS),
    pa.field("lvlm_model", pa.string()),
    pa.field("captioner_model", pa.string()),
    pa.field("selector_model", pa.string()),
    pa.field("clip_model", pa.string()),  # --clip (the text guide), null without one
    pa.field("run_id", pa.string()),
)
OUTPUT_COLUMNS = tuple(f.name for f in OUTPUT_FIELDS)


def output_schema(passthrough: pa.Schema) -> pa.Schema:
    """Full output schema: ``id``, the passthrough columns of ``passthrough``, then ``OUTPUT_FIELDS``.

    ``passthrough`` may be the raw input schema: the image bytes are dropped here. A passthrough column
    that collides with an output column name is an error (it would be silently overwritten).
    """
    base = passthrough_schema(passthrough)
    clash = [n for n in base.names if n in OUTPUT_COLUMNS]
    if clash:
        raise SchemaError(f"input column {clash[0]!r} collides with an output column of the same name")
    return pa.schema(list(base) + list(OUTPUT_FIELDS))


def error_row(input_row: Mapping[str, Any], error: str, **ctx: Any) -> dict[str, Any]:
    """An output row for an input that could not be processed: passthrough values, nulls, ``error``.

    ``ctx`` fills output columns known even for a bad row (``method``, ``keep_tokens``, ``run_id``,
    model names, ...). Unknown keys are rejected so that a typo does not vanish silently.
    """
    unknown = [k for k in ctx if k not in OUTPUT_COLUMNS]
    if unknown:
        raise KeyError(f"error_row: {unknown[0]!r} is not an output column")
    row: dict[str, Any] = {k: v for k, v in input_row.items() if k not in NOT_PASSED_THROUGH}
    row.update({name: None for name in OUTPUT_COLUMNS})
    row.update(ctx)
    row["error"] = str(error)
    return row
