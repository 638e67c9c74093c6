"""Rebuild the proving ground v2 from nothing, in order, resumably, and time each stage.

The shipped models under ``models/shapes_v2/`` grew over many sessions (their cards list each step). This job is
the from-scratch chain the issue asks for, as one command on the 2-core CPU machine:

1. ``clip``: the Shapes v2 CLIP (``jobs/train_clip.py``), its tower the LVLM's;
2. ``lvlm-stage1``: the LVLM's plain stage 1 (``jobs/train_lvlm_v2.py``: image questions, no augmentation);
3. ``lvlm-stage2``: its instruction stage with the recipe's levers (``LVLM_STAGE2``), from stage 1's checkpoint,
   its first ``LVLM_SHAPE_PHASE_STEPS`` with every token in order and the lookup levers off;
4. ``captioner``: ACCM's caption model, pre-trained over the discarded patches (``jobs/train_accm.py``);
5. ``accm``: the self-supervised ACCM stage (caption model + selector, Ray Train + DeepSpeed);
6. ``eval``: the ACCM ablation on val items (never a test seed: those are measured once, by hand).

Everything goes under ``--workdir``. A stage that finished is skipped when the job runs again; one that was
interrupted starts again from its own checkpoint (``--resume`` where the stage's job takes it; the ACCM stages
resume from their Ray Train checkpoints by name). ``chain_log.json`` there records each stage's command and the
minutes of every attempt, so the total is the machine time the chain really took.

    .venv/bin/python jobs/reproduce_v2.py --workdir runs/chain             # the whole chain (~140-175 min on 2 cores)
    .venv/bin/python jobs/reproduce_v2.py --workdir runs/chain --dry-run   # only print the commands
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jobs.train_utils import log, shown_path  # noqa: E402

# The LVLM's instruction stage: token drops and shuffles (robust to pruned inputs), the cell words' weight and
# grounding (cells found by content), more count / exist / shape questions, the pair that made a from-scratch
# run read image shape (docs/notes/proving-ground-v2.md, session 15), and the pair that made one read spatial
# questions: the shape word's search weighed up and its row gathered (session 17).
LVLM_STAGE2 = ("--drop-visual", "0.8", "--shuffle-visual", "1.0", "--cell-weight", "2", "--cell-grounding", "1",
               "--question-weights", "count=3,exist=1.5,shape=1.5", "--shape-grounding", "1", "--gather-sup", "1",
               "--search-weight", "2", "--row-gather", "1")
# Its length: over 2200 steps one run of two learnt to read image shape (session 17: 74.4% on val) and the other
# did not (session 18: 50.8%); over 4000, that second run's CLIP and stage 1 read shape from step ~2400 and ended at
# 70.8% (session 19). ~103 minutes on 2 cores.
LVLM_STAGE2_STEPS = 4000
# Its first steps with every token in order and the lookup levers off (``--shape-phase``), so the shape pair
# teaches image shape before the search by content starts: on the same CLIP and stage 1 over 4000 steps, val
# 86.4% against 70.8% without it, spatial 88% against 36% (session 21). Scaled with the other step counts.
LVLM_SHAPE_PHASE_STEPS = 600
# Its precision: the LLM's forward and backward under CPU bf16 autocast where the CPU has native bf16, float32
# elsewhere (``--autocast auto``). 1.32-1.37x per step measured interleaved; two bf16 runs ended at 77.6 and 84.0%
# on val against 79.6-86.4% for three float32 runs (docs/reports/proving-ground-v2/chain_bf16_stage2/). ~88
# minutes of stage 2 instead of ~110, so the chain keeps its 3 hours on a slow day.
LVLM_STAGE2_PRECISION = ("--autocast", "auto")
CAPTIONER_ARCH = '{"input_features": "projected"}'
SELECTOR_ARCH = '{"template": "{q} {c}", "share_prefix": true}'
TINY_LVLM_LAYERS = ("--word-layer", "0", "--context-layer", "1", "--hop-layer", "2")  # the tiny LLM has 3
STAGES = ("clip", "lvlm-stage1", "lvlm-stage2", "captioner", "accm", "eval")


@dataclass(frozen=True)
class Stage:
    """One step of the chain: its command, and the flags that continue an interrupted attempt."""

    name: str
    argv: list[str]
    resume: list[str] = field(default_factory=list)  # added when ``checkpoint`` exists
    checkpoint: Path | None = None


def stages(args: argparse.Namespace) -> list[Stage]:
    """The chain's commands for ``args`` (``--scale`` multiplies every step count, for smoke runs)."""
    w = Path(args.workdir)

    def steps(n: int) -> str:
        return str(max(1, round(n * args.scale)))

    threads = ("--threads", str(args.threads))
    lvlm = ["jobs/train_lvlm_v2.py", "--clip", str(w / "clip"), "--output", str(w / "lvlm"),
            "--ckpt", str(w / "lvlm_ckpt.pt"), "--preset", args.preset, "--stage1-steps", steps(750),
            "--eval-every", steps(300), "--ckpt-every", steps(300), *threads,
            *(TINY_LVLM_LAYERS if args.preset == "tiny" else ())]
    accm = ["jobs/train_accm.py", "--world", "v2", "--lvlm", str(w / "lvlm"), "--clip", str(w / "clip"),
            "--captioner", str(w / "captioner"), "--selector", str(w / "selector"), "--storage", str(w / "ray"),
            *threads]
    return [
        Stage("clip", ["jobs/train_clip.py", "--output", str(w / "clip"), "--ckpt", str(w / "clip_ckpt.pt"),
                       "--preset", args.preset, "--steps", steps(1500), *threads],
              ["--resume"], w / "clip_ckpt.pt"),
        Stage("lvlm-stage1", [*lvlm, "--stage2-steps", "0"], ["--resume"], w / "lvlm_ckpt.pt"),
        Stage("lvlm-stage2", [*lvlm, "--stage2-steps", steps(LVLM_STAGE2_STEPS), *LVLM_STAGE2,
                              "--shape-phase", steps(LVLM_SHAPE_PHASE_STEPS), *LVLM_STAGE2_PRECISION, "--resume"]),
        Stage("captioner", [*accm, "--stage", "pretrain", "--name", "chain-pretrain",
                            "--pretrain-steps", steps(3000), "--batch-size", "32", "--ckpt-every", steps(250),
                            "--pretrain-keep", "9-72", "--pretrain-targets", "abstain",
                            "--captioner-arch", CAPTIONER_ARCH]),
        Stage("accm", [*accm, "--stage", "accm", "--name", "chain-accm", "--accm-steps", steps(600),
                       "--ckpt-every", steps(100), "--accm-reference", "answer", "--selector-text", str(w / "clip"),
                       "--selector-arch", SELECTOR_ARCH]),
        Stage("eval", [*accm, "--stage", "eval", "--eval-split", "val", "--eval-seed", "0",
                       "--eval-n", str(args.eval_n), "--eval-out", str(w / "accm_val_ablation")]),
    ]


def command_line(stage: Stage, resuming: bool) -> list[str]:
    return [sys.executable, *stage.argv, *(stage.resume if resuming else [])]


def shown(argv: list[str]) -> str:
    """A command as the log shows it: repository-relative, no interpreter path."""
    return shlex.join(["python", *(shown_path(a) if a.startswith(str(REPO)) else a for a in argv[1:])])


def run(args: argparse.Namespace) -> dict:
    """Run the chain's unfinished stages in order; returns (and writes) the chain log."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "chain_log.json"
    record = json.loads(log_path.read_text()) if log_path.exists() else {"stages": {}}
    wanted = args.stages.split(",") if args.stages else list(STAGES)
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; the chain's are {', '.join(STAGES)}")
    env = dict(os.environ, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0")
    for stage in stages(args):
        if stage.name not in wanted:
            continue
        entry = record["stages"].setdefault(stage.name, {"attempts": [], "done": False})
        if entry["done"]:
            log(f"{stage.name}: done before ({sum(entry['attempts']):.1f} min), skipped")
            continue
        resuming = stage.checkpoint is not None and stage.checkpoint.exists()
        argv = command_line(stage, resuming)
        entry["command"] = shown(argv)
        log(f"{stage.name}: {'resuming' if resuming else 'starting'}: {entry['command']}")
        if args.dry_run:
            continue
        t0 = time.time()
        code = subprocess.run(argv, cwd=REPO, env=env).returncode
        entry["attempts"].append(round((time.time() - t0) / 60, 2))
        entry["done"] = code == 0
        record["minutes"] = round(sum(sum(e["attempts"]) for e in record["stages"].values()), 2)
        log_path.write_text(json.dumps(record, indent=1) + "\n")
        if code != 0:
            raise SystemExit(f"{stage.name} failed (exit {code}); run the same command again to resume it")
        log(f"{stage.name}: done in {entry['attempts'][-1]:.1f} min; chain so far {record['minutes']:.1f} min")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=str(REPO / "runs/chain"), help="where every stage writes (and resumes)")
    p.add_argument("--stages", default="", help=f"comma-separated subset of {', '.join(STAGES)} (default: all)")
    p.add_argument("--preset", default="default", choices=("default", "tiny"),
                   help="model sizes of the CLIP and the LVLM (tiny: for smoke runs)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's step count")
    p.add_argument("--eval-n", type=int, default=500, help="val items of the final ablation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
