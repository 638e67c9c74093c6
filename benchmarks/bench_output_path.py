"""Fault-free throughput of the main job: this checkout against an earlier commit, same input, one run.

    .venv/bin/python benchmarks/bench_output_path.py [--baseline 83b80bb] [--repeat 4] [--rounds 2]

The baseline is checked out into a temporary git worktree (83b80bb: the last commit before the durable
output path, whose driver pulled every row and wrote each shard itself). Both trees run
``jobs/caption_dataset.py`` as a user would (a fresh process and a private local Ray each time) on the same
input, alternating ``--rounds`` times so that drift on the machine hits both alike; the ratio of their median
end-to-end items/s is printed. Input: ``--repeat`` copies of ``--input``'s shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(tree: Path, args: list[str], out: Path) -> tuple[float, int]:
    """(end-to-end seconds, items) of one job run from ``tree``."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "jobs/caption_dataset.py", *args, "--output", str(out)], cwd=tree, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, int(json.loads((out / "summary.json").read_text())["items"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="83b80bb", help="git commit to compare against")
    parser.add_argument("--input", default=str(REPO / "data/shapes_vqa/test"))
    parser.add_argument("--repeat", type=int, default=4, help="copies of the input shards")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="accm", help="the embedded default's method")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-output-path-"))
    base = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        src = tmp / "in"
        src.mkdir()
        shards = sorted(Path(args.input).glob("*.parquet"))
        for r in range(args.repeat):
            for f in shards:
                shutil.copyfile(f, src / f"r{r}-{f.name}")
        models = REPO / "models/shapes"
        job = ["--input", str(src), "--method", args.method, "--lvlm", str(models / "lvlm"),
               "--captioner", str(models / "captioner"), "--selector", str(models / "selector"),
               "--batch-size", str(args.batch_size)]
        walls: dict[str, list[float]] = {"this checkout": [], f"baseline {args.baseline}": []}
        items = 0
        for _ in range(args.rounds):
            for name, tree in ((f"baseline {args.baseline}", base), ("this checkout", REPO)):
                wall, items = run_job(tree, job, tmp / "out")
                walls[name].append(wall)
                print(f"{name:<24} {items} items in {wall:6.1f} s  ({items / wall:6.1f} items/s)", flush=True)
        med = {name: items / statistics.median(w) for name, w in walls.items()}
        print(f"\nmethod={args.method} batch={args.batch_size} items={items} rounds={args.rounds}")
        for name, ips in med.items():
            print(f"{name:<24} median {ips:6.1f} items/s end to end")
        print(f"ratio this checkout / baseline: {med['this checkout'] / med[f'baseline {args.baseline}']:.2f}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
