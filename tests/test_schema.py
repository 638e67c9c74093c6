"""The data contract: input validation messages and the output schema every stage writes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.schema import SchemaError, error_row, output_schema, validate_input_schema
from pipeline.shapes import item_row, make_item


def test_generator_rows_follow_the_input_schema(tmp_path):
    rows = [item_row(make_item(0, "val", i)) for i in range(3)]
    table = pa.Table.from_pylist(rows, schema=schema.INPUT_SCHEMA)
    pq.write_table(table, tmp_path / "x.parquet")
    validate_input_schema(pq.read_schema(tmp_path / "x.parquet"), str(tmp_path / "x.parquet"))
    schema.validate_unique_ids(table.column("id").to_pylist(), "x.parquet")


def test_minimal_uri_input_with_extra_columns_is_valid():
    s = pa.schema([("id", pa.large_string()), ("image_uri", pa.string()), ("question", pa.string_view()),
                   ("answers", pa.large_list(pa.string())), ("source", pa.int64())])
    validate_input_schema(s, "f.parquet")


@pytest.mark.parametrize(
    "fields, match",
    [
        ([("image", pa.binary()), ("question", pa.string())], r"bad\.parquet: missing required column 'id'.*string"),
        ([("id", pa.string()), ("image", pa.binary())], r"missing required column 'question'"),
        ([("id", pa.string()), ("question", pa.string())], r"bad\.parquet: missing image column.*'image'.*'image_uri'"),
        ([("id", pa.int64()), ("image", pa.binary()), ("question", pa.string())],
         r"bad\.parquet: column 'id' has type int64: expected string"),
        ([("id", pa.string()), ("image", pa.string()), ("question", pa.string())],
         r"column 'image' has type string: expected binary \(encoded PNG/JPEG bytes\)"),
        ([("id", pa.string()), ("image", pa.binary()), ("question", pa.string()), ("answers", pa.string())],
         r"column 'answers' has type string: expected list<string>"),
        ([("id", pa.string()), ("image", pa.binary()), ("question", pa.string()), ("answers", pa.list_(pa.int32()))],
         r"column 'answers' has type list<item: int32>: expected list<string>"),
        ([("id", pa.string()), ("image_uri", pa.binary()), ("question", pa.string())],
         r"column 'image_uri' has type binary: expected string"),
        ([("id", pa.string()), ("image", pa.binary()), ("question", pa.string()), ("scene", pa.int8())],
         r"column 'scene' has type int8: expected string"),
    ],
)
def test_validation_names_column_file_and_expectation(fields, match):
    with pytest.raises(SchemaError, match=match):
        validate_input_schema(pa.schema(fields), "bad.parquet")


def test_unique_ids():
    with pytest.raises(SchemaError, match=r"s\.parquet: column 'id' repeats 'a' \(row 2\)"):
        schema.validate_unique_ids(["a", "b", "a"], "s.parquet")
    with pytest.raises(SchemaError, match=r"column 'id' is null in row 1"):
        schema.validate_unique_ids(["a", None], "s.parquet")


def test_output_schema_layout():
    out = output_schema(schema.INPUT_SCHEMA.append(pa.field("image_uri", pa.string())).append(pa.field("extra", pa.int16())))
    assert out.names[:1] == ["id"]
    assert "image" not in out.names  # image bytes never go to the output
    assert out.names[1:8] == ["question", "answers", "question_type", "scene", "fact", "image_uri", "extra"]
    assert out.names[8:] == list(schema.OUTPUT_COLUMNS)
    assert out.field("extra").type == pa.int16()
    expected = {
        "prediction": pa.string(), "caption": pa.string(), "caption_candidates": pa.list_(pa.string()),
        "selector_probs": pa.list_(pa.float32()), "method": pa.string(), "keep_tokens": pa.int32(),
        "visual_tokens_total": pa.int32(), "score": pa.float64(), "error": pa.string(),
        "flops_total": pa.float64(), "flops_reference_total": pa.float64(), "flops_llm_decode": pa.float64(),
        "latency_lvlm_s": pa.float64(), "lvlm_model": pa.string(), "run_id": pa.string(),
    }
    for name, dtype in expected.items():
        assert out.field(name).type == dtype, name
    for name in schema.FLOPS_COLUMNS + schema.LATENCY_COLUMNS:
        assert out.field(name).type == pa.float64()


def test_output_schema_rejects_collisions():
    with pytest.raises(SchemaError, match="'score' collides"):
        output_schema(pa.schema([("id", pa.string()), ("score", pa.float64())]))


def test_error_row_is_a_valid_output_row():
    row = item_row(make_item(0, "test", 0))
    out = error_row(row, "image: cannot identify image file", method="accm", keep_tokens=8, run_id="r1")
    assert "image" not in out
    assert out["error"] == "image: cannot identify image file"
    assert out["method"] == "accm" and out["keep_tokens"] == 8 and out["run_id"] == "r1"
    assert out["prediction"] is None and out["score"] is None and out["flops_total"] is None
    assert out["question"] == row["question"] and out["answers"] == row["answers"]
    table = pa.Table.from_pylist([out], schema=output_schema(schema.INPUT_SCHEMA))
    assert table.num_rows == 1 and table.column("error")[0].as_py() == out["error"]
    with pytest.raises(KeyError, match="'metod'"):
        error_row(row, "x", metod="accm")
