"""Per-shard completion markers: what makes ``--resume`` exact after a crash.

Protocol: a shard's output file ``<output>/<rel>`` is written in full (one upload made visible at once on S3,
write-then-rename on a local disk) by its finalize task, from the parts the writer stage left under ``_parts/<rel>/``
(``pipeline.progress``), and only then the marker ``<output>/_done/<rel>.json`` (rows, digest of the ids,
run id, the shard's summary statistics); then the parts are deleted. A marker therefore proves a complete
output file; a crash before it leaves the parts, which the resumed run keeps (their rows are not redone)
and finalizes again under the same deterministic name. No duplicates, no loss, no listing tricks beyond
one prefix per unmarked shard: S3 gives read-after-write consistency for single objects, which is all
this needs. An S3 write interrupted between opening its upload and writing to it can leave an empty
object: an empty marker reads as no marker, an empty output file has no marker, and an empty part is
ignored by ``pipeline.progress.read_part``, so each is redone.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

from pipeline import storage

MARKER_DIR = "_done"


def join(url: str, relative: str) -> str:
    return url.rstrip("/") + "/" + relative.lstrip("/")


def output_url(output: str, rel: str) -> str:
    return join(output, rel)


def marker_url(output: str, rel: str) -> str:
    return join(output, f"{MARKER_DIR}/{rel}.json")


@dataclass(frozen=True)
class Marker:
    rel: str
    rows: int
    ids_digest: str
    run_id: str
    stats: dict | None = None  # the shard's summary statistics (pipeline.summary.table_stats)


def ids_digest(ids: list[str]) -> str:
    """Digest of the row ids a shard's output holds: a resumed run with another ``--limit`` redoes it."""
    import hashlib

    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def write_atomic(url: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write ``data`` so that readers see all of it or nothing (rename locally, one PUT on S3)."""
    scheme_local = not url.startswith(("s3://", "s3a://"))
    if scheme_local:
        path = os.path.abspath(url.removeprefix("file://"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        storage.write_bytes(url, data, s3_endpoint=s3_endpoint)


def write_marker(output: str, rel: str, rows: int, digest: str, run_id: str, stats: dict | None = None,
                 s3_endpoint: str | None = None) -> None:
    body = {"file": rel, "rows": rows, "ids_digest": digest, "run_id": run_id,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stats": stats}
    write_atomic(marker_url(output, rel), json.dumps(body).encode(), s3_endpoint)


def read_marker(output: str, rel: str, s3_endpoint: str | None = None) -> Marker | None:
    """The shard's marker, or None when there is none (or it is unreadable: then the shard is redone).
    Transient store errors are retried inside ``storage``; a spent retry budget propagates."""
    url = marker_url(output, rel)
    try:
        body = json.loads(storage.read_bytes(url, s3_endpoint=s3_endpoint))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return Marker(rel=body["file"], rows=int(body["rows"]), ids_digest=body["ids_digest"], run_id=body["run_id"],
                  stats=body.get("stats"))


def clear_marker(output: str, rel: str, s3_endpoint: str | None = None) -> None:
    storage.delete(marker_url(output, rel), s3_endpoint=s3_endpoint)
