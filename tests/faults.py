"""Faults injected from the tests, never from production code: tier subclasses that die or dawdle, a watcher
that kills a running job with SIGKILL once enough of its rows are durable, and a runner script for it.

Ray workers cannot import this module by name (``tests`` is not a package on their path), so a test that
hands one of these classes to Ray first calls ``by_value()``: Ray then ships the class itself.

    python tests/faults.py --slow-lvlm-s 0.05 [--answered-dir D] <caption_dataset.py flags>  # LVLM slowed down
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.lvlm_tier import LVLMTier  # noqa: E402
from pipeline.tp_replica import LVLMRank  # noqa: E402


def by_value() -> None:
    """Let Ray pickle this module's classes by value (workers cannot import ``faults``)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _first_time(where: str, marker: str) -> bool:
    """True once per directory lifetime (an O_EXCL file), across processes and actor restarts."""
    try:
        fd = os.open(os.path.join(where, marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class DyingLVLMTier(LVLMTier):
    """Its first batch (per ``death_dir``) exits the actor's process mid-batch, as an OOM kill would."""

    death_dir: str = ""

    def __call__(self, batch):
        if self.death_dir and _first_time(self.death_dir, "lvlm-actor-died"):
            os._exit(1)
        return super().__call__(batch)


class DyingRank(LVLMRank):
    """A tp helper rank whose first ``generate`` (per ``death_dir``) exits its process."""

    death_dir: str = ""

    def generate(self, inputs):
        if self.death_dir and _first_time(self.death_dir, "tp-helper-died"):
            os._exit(1)
        return super().generate(inputs)


class DyingHelperLVLMTier(LVLMTier):
    rank_class = DyingRank


class SlowLVLMTier(LVLMTier):
    """Answers like the real tier, ``seconds_per_row`` slower: a run long enough to be killed at a chosen point.
    With ``answered_dir`` set, the ids it answered go to a file there (finished work a crash may lose)."""

    seconds_per_row: float = 0.0
    answered_dir: str = ""

    def __call__(self, batch):
        time.sleep(self.seconds_per_row * batch.num_rows)
        out = super().__call__(batch)
        if self.answered_dir:
            with open(os.path.join(self.answered_dir, f"answered-{os.getpid()}.txt"), "a") as f:
                f.write("".join(i + "\n" for i in out.column("id").to_pylist()))
        return out


def answered_ids(where: str | Path) -> set[str]:
    """Ids ``SlowLVLMTier`` answered (all its processes), from the files in ``answered_dir``."""
    return {line.strip() for p in Path(where).glob("answered-*.txt") for line in p.read_text().splitlines()
            if line.strip()}


# ----------------------------------------------------------------------------------------------------
# kill -9 at a chosen fraction of durable rows


def durable_rows(output: Path) -> int:
    """Rows of a job's output that a crash cannot lose: in parts (``_parts/``) or in marked shard files."""
    return len(durable_ids(output))


def durable_ids(output: Path) -> set[str]:
    """Ids of the rows in parts or in marked shard files (looked at again if a finalize moves them meanwhile)."""
    while True:
        try:
            return _durable_ids(output)
        except (FileNotFoundError, OSError):  # a folder or part went while it was read: look again
            time.sleep(0.01)


def _durable_ids(output: Path) -> set[str]:
    import json

    import pyarrow.parquet as pq

    ids: set[str] = set()
    marked = set()
    done = output / "_done"
    for marker in done.rglob("*.json") if done.exists() else ():
        try:
            json.loads(marker.read_text())["rows"]
        except (ValueError, KeyError):
            continue  # being written
        rel = str(marker.relative_to(done))[: -len(".json")]
        marked.add(rel)
        ids.update(pq.read_table(output / rel, columns=["id"]).column("id").to_pylist())
    parts = output / "_parts"
    for part in parts.rglob("*.parquet") if parts.exists() else ():
        if part.is_file() and str(part.parent.relative_to(parts)) not in marked:  # (shard folders match too)
            ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (Ray starts its raylet and workers in
    sessions of their own, so the group alone would leave them writing)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGSTOP)  # freeze first, so nothing writes while the rest is killed
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_at(cmd: list[str], output: Path, rows: int, *, env: dict[str, str], timeout: float = 600.0,
            ) -> tuple[int, int]:
    """Run ``cmd`` in a new session and SIGKILL its whole process group (the driver and its local Ray) as
    soon as ``rows`` rows of ``output`` are durable. Returns (return code, durable rows seen at the kill)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = durable_rows(output)
            if seen >= rows:
                _kill_tree(proc.pid)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    _, err = proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        sys.stderr.write(err[-3000:])
    return proc.returncode, seen


def main(argv: list[str]) -> int:
    """The main job with ``SlowLVLMTier`` (``--slow-lvlm-s S`` first), on a private local Ray."""
    import ray

    from pipeline.config import parse_args
    from pipeline.graph import run_job
    from pipeline.logs import setup_logging

    assert argv[0] == "--slow-lvlm-s", "usage: faults.py --slow-lvlm-s S [--answered-dir D] <job flags>"
    SlowLVLMTier.seconds_per_row = float(argv[1])
    argv = argv[2:]
    if argv and argv[0] == "--answered-dir":
        SlowLVLMTier.answered_dir, argv = argv[1], argv[2:]
    setup_logging()  # (classes of a script's __main__ are pickled by value anyway)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    run_job(parse_args(argv), lvlm=SlowLVLMTier)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
