"""Input formats: every benchmark file as it ships, read into the input contract (``pipeline.schema``).

Formats (``--input-format``, detected from the file names when unambiguous):

* ``parquet``: the project's own shards (``id``, ``question``, ``image``/``image_uri``, ...), read as they are;
* ``llava-jsonl``: LLaVA's evaluation question files (``playground/data/eval/*/*.jsonl``: question_id, image,
  text, category), images under ``--image-root``;
* ``llava-json``: LLaVA's ScienceQA file (``llava_test_CQM-A.json``: a JSON array with conversations);
* ``mmbench-tsv``: MMBench's TSV (images inline as base64);
* ``mmvp-csv``: MMVP's ``Questions.csv`` (images ``MMVP Images/{index}.jpg`` under ``--image-root``);
* ``hf-parquet``: Hugging Face datasets shards as lmms-eval ships them (image column ``{bytes, path}``).

Every non-native file is one shard: a task module (``--task``, ``pipeline.tasks``) maps each raw record to a
contract row, joined with the ground truth read from ``--annotations`` as the benchmark ships it. The job
reads a file in Ray workers (planning, the graph's read stage, finalizing), never on the driver, and images
stay where they are (``image_uri`` = ``--image-root`` + the record's file name). The output file of a shard
is its name with ``.parquet`` (``llava_pope_test.jsonl`` -> ``llava_pope_test.parquet``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.resume import join
from pipeline.schema import INPUT_FIELDS, SchemaError, validate_input_schema

NATIVE = "parquet"
FORMATS = (NATIVE, "llava-jsonl", "llava-json", "mmbench-tsv", "mmvp-csv", "hf-parquet")
_EXTENSIONS = {"llava-jsonl": ".jsonl", "llava-json": ".json", "mmbench-tsv": ".tsv", "mmvp-csv": ".csv",
               "hf-parquet": ".parquet", NATIVE: ".parquet"}
CHUNK_ROWS = 1024  # rows per block the read stage yields (the graph cuts blocks smaller still)
INPUT_ERROR = "input_error"  # a record the task could not map (its row gets this as its error)


@dataclass(frozen=True)
class Source:
    """How to read the job's input: its format, the task that maps its records, and where the rest lies."""

    fmt: str = NATIVE
    task: str | None = None
    image_root: str | None = None  # default: the folder of each input file
    annotations: str | None = None
    s3_endpoint: str | None = None
    answer_line: str | None = None  # None: the benchmark's answer-format line; '' drops it; else replaces it

    @property
    def native(self) -> bool:
        return self.fmt == NATIVE

    @property
    def kind(self) -> str:
        """The format's name in messages."""
        return "Parquet" if self.native else self.fmt


# ----------------------------------------------------------------------------------------------------
# listing and naming


def list_inputs(url: str, fmt: str | None, s3_endpoint: str | None = None) -> list[str]:
    """The input files under ``url`` (a file or a folder) of format ``fmt`` (None: any known extension)."""
    suffixes = (_EXTENSIONS[fmt],) if fmt else tuple(sorted(set(_EXTENSIONS.values())))
    return storage.list_data_files(url, suffixes, s3_endpoint=s3_endpoint)


def detect_format(urls: list[str], task: str | None, s3_endpoint: str | None = None) -> str:
    """The format of ``urls`` from their extensions; with a task, Parquet is the project's own only if its schema
    follows the input contract (a Hugging Face dataset's image is a ``{bytes, path}`` struct: ``hf-parquet``)."""
    kinds = {next((f for f, e in _EXTENSIONS.items() if u.endswith(e) and f != "hf-parquet"), None)
             for u in urls}
    if len(kinds) != 1 or None in kinds:
        raise SchemaError(f"cannot tell the input format of {', '.join(urls[:3])}: pass --input-format "
                          f"({', '.join(FORMATS)})")
    fmt = kinds.pop()
    if fmt == NATIVE and task is not None:
        fs, path = storage.resolve(urls[0], s3_endpoint=s3_endpoint)
        schema = storage.call("read schema", urls[0], pq.read_schema, path, filesystem=fs)
        try:
            validate_input_schema(schema, urls[0])
        except SchemaError:
            return "hf-parquet"
    return fmt


def output_name(rel: str, fmt: str) -> str:
    """The output file of an input file: the same relative name, ending in ``.parquet``."""
    if fmt == NATIVE or rel.endswith(".parquet"):
        return rel
    return rel.rsplit(".", 1)[0] + ".parquet"


# ----------------------------------------------------------------------------------------------------
# the contract table of a non-native file


def contract_schema(task: str | None) -> pa.Schema:
    """The input contract a task's rows follow: the project's columns, then the benchmark's own fields."""
    from pipeline import tasks

    base = [f for f in INPUT_FIELDS if f.name not in ("scene", "fact")] + [pa.field(INPUT_ERROR, pa.string())]
    extra = list(tasks.get(task).EXTRA_FIELDS) if task else []
    return pa.schema(base + extra)


def _records(url: str, source: Source) -> Iterator[dict[str, Any]]:
    """The raw records of one file, in file order."""
    if source.fmt == "hf-parquet":
        fs, path = storage.resolve(url, s3_endpoint=source.s3_endpoint)
        handle = storage.call("open", url, pq.ParquetFile, path, filesystem=fs)
        for batch in handle.iter_batches(batch_size=CHUNK_ROWS):
            yield from batch.to_pylist()
        return
    text = storage.read_bytes(url, s3_endpoint=source.s3_endpoint).decode("utf-8-sig")
    if source.fmt == "llava-jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield {INPUT_ERROR: f"{INPUT_ERROR}: line {n} is not JSON: {exc}", "_line": n}
    elif source.fmt == "llava-json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise SchemaError(f"{storage.redact(url)}: expected a JSON array of questions")
        yield from data
    elif source.fmt in ("mmbench-tsv", "mmvp-csv"):
        csv.field_size_limit(sys.maxsize)  # MMBench's base64 images are far over csv's default field limit
        yield from csv.DictReader(io.StringIO(text), delimiter="\t" if source.fmt == "mmbench-tsv" else ",")
    else:
        raise ValueError(f"unknown input format {source.fmt!r} ({', '.join(FORMATS)})")


def _image_root(url: str, source: Source) -> str:
    return source.image_root or url.rsplit("/", 1)[0]


def _contract_row(row: dict[str, Any], url: str, source: Source, images: bool) -> dict[str, Any]:
    """A task's row -> contract values: the image source resolved (base64 decoded, files under the root)."""
    out = dict(row)
    if source.answer_line is not None and out.get("question"):
        out["question"] = replace_answer_line(out["question"], source.answer_line)
    b64, name = out.pop("image_b64", None), out.pop("image_file", None)
    if name:
        out["image_uri"] = join(_image_root(url, source), str(name))
    if not images:
        out["image"] = None
        return out
    if b64 is not None and out.get("image") is None:
        try:
            out["image"] = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            out[INPUT_ERROR] = out.get(INPUT_ERROR) or f"image: not valid base64 ({exc})"
    return out


def replace_answer_line(question: str, line: str) -> str:
    """``question`` without LLaVA's answer-format line(s) at its end, then ``line`` after a newline (if any)."""
    from actors.prompt import ANSWER_SUFFIXES

    known = {v for v in ANSWER_SUFFIXES.values() if v}
    lines = question.rstrip().split("\n")
    while len(lines) > 1 and lines[-1].strip() in known:
        lines.pop()
    text = "\n".join(lines).rstrip()
    return f"{text}\n{line}" if line else text


def iter_tables(url: str, source: Source, *, images: bool = True,
                chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """The file as contract tables of at most ``chunk_rows`` rows (``images=False``: no image bytes, for
    planning and finalizing, which need ids and passthrough fields only)."""
    from pipeline import tasks

    task = tasks.get(source.task) if source.task else None
    if task is None:
        raise SchemaError(f"{storage.redact(url)}: the {source.fmt} format needs --task (which benchmark it is)")
    if source.fmt not in task.FORMATS:
        raise SchemaError(f"--task {source.task} does not read {source.fmt} (it reads {', '.join(task.FORMATS)})")
    from pipeline.tasks.common import Reader

    truth = task.load_truth(source.annotations, Reader(source.s3_endpoint))
    schema = contract_schema(source.task)
    rows: list[dict[str, Any]] = []
    for index, record in enumerate(_records(url, source)):
        if INPUT_ERROR in record:
            row = {"id": f"line-{record['_line']}", INPUT_ERROR: record[INPUT_ERROR]}
        else:
            try:
                row = task.to_row(record, source.fmt, truth, index)
            except Exception as exc:  # noqa: BLE001 - a record the task cannot read is that row's error
                row = {"id": _fallback_id(record, index), INPUT_ERROR: f"{INPUT_ERROR}: {type(exc).__name__}: {exc}"}
        rows.append(_contract_row(row, url, source, images))
        if len(rows) >= chunk_rows:
            yield _to_table(rows, schema)
            rows = []
    if rows:
        yield _to_table(rows, schema)


def _fallback_id(record: dict[str, Any], index: int) -> str:
    for key in ("question_id", "questionId", "index", "id"):
        if record.get(key) not in (None, ""):
            return str(record[key])
    return f"row-{index}"


def _to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def read_table(url: str, source: Source, columns: list[str] | None = None) -> pa.Table:
    """A whole input file as one contract table (the native format: its Parquet columns as they are)."""
    if source.native:
        fs, path = storage.resolve(url, s3_endpoint=source.s3_endpoint)
        return storage.call("read", url, pq.read_table, path, filesystem=fs, columns=columns)
    tables = list(iter_tables(url, source, images=columns is None or "image" in columns))
    table = pa.concat_tables(tables) if tables else contract_schema(source.task).empty_table()
    return table.select(columns) if columns else table


def read_schema(url: str, source: Source) -> pa.Schema:
    if source.native:
        fs, path = storage.resolve(url, s3_endpoint=source.s3_endpoint)
        return storage.call("read schema", url, pq.read_schema, path, filesystem=fs)
    return contract_schema(source.task)


def read_files(batch: pa.Table, *, source: Source) -> Iterator[pa.Table]:
    """The graph's read stage for non-native files (a Ray Data generator UDF): rows ``(url, path)`` -> the
    files' contract rows in blocks of ``CHUNK_ROWS``, each with its file's ``path`` (the shard key)."""
    for url, path in zip(batch.column("url").to_pylist(), batch.column("path").to_pylist(), strict=True):
        for table in iter_tables(url, source):
            yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
