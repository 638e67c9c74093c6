#!/usr/bin/env bash
# runs/chain_phase.sh: the chain with its shape phase (4000-step stage 2, --shape-phase 600), assembled from
# stages already run with the chain's own commands (CLIP: runs/chain_full; LVLM stage 1: runs/long_s2.sh on that
# CLIP; stage 2: ../lvlm_shape_phase_4000_step.sh from that stage 1), then the chain's last three stages by
# jobs/reproduce_v2.py itself (resumable: run again after an interruption)
set -euo pipefail
w=runs/chain_phase
if [ ! -f $w/chain_log.json ]; then
  mkdir -p $w
  cp -r runs/chain_full/clip runs/chain_full/clip_ckpt.pt $w/
  cp -r runs/phase4000 $w/lvlm; cp runs/phase4000_ckpt.pt $w/lvlm_ckpt.pt
  python3 - <<'PY'
import json
w = "runs/chain_phase"
lv = ("python jobs/train_lvlm_v2.py --clip {w}/clip --output {w}/lvlm --ckpt {w}/lvlm_ckpt.pt --preset default "
      "--stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2").format(w=w)
s2 = ("--drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --question-weights "
      "count=3,exist=1.5,shape=1.5 --shape-grounding 1 --gather-sup 1 --search-weight 2 --row-gather 1 --shape-phase 600 --resume")
rec = {"stages": {
  "clip": {"attempts": [15.71], "done": True, "from": "runs/chain_full (same command)",
           "command": f"python jobs/train_clip.py --output {w}/clip --ckpt {w}/clip_ckpt.pt --preset default --steps 1500 --threads 2"},
  "lvlm-stage1": {"attempts": [17.24], "done": True, "from": "runs/long_s2.sh (same command)",
                  "command": f"{lv} --stage2-steps 0"},
  "lvlm-stage2": {"attempts": [108.46], "done": True, "from": "runs/phase4000.sh (same command)",
                  "command": f"{lv} --stage2-steps 4000 {s2}"}}}
rec["minutes"] = round(sum(sum(e["attempts"]) for e in rec["stages"].values()), 2)
open(f"{w}/chain_log.json", "w").write(json.dumps(rec, indent=1) + "\n")
PY
fi
exec .venv/bin/python jobs/reproduce_v2.py --workdir $w
