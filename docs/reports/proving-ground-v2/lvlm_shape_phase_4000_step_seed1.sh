#!/usr/bin/env bash
# lvlm_shape_phase_4000_step_seed1.sh (ran as runs/seed1.sh): the chain's 4000-step stage 2 with the shape phase (runs/phase4000.sh) with --seed 1 (the data
# draws of stage 2; the same stage 1): the run-to-run spread of the chain's LVLM; resumable
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [ ! -f runs/seed1_ckpt.pt ]; then
  rm -rf runs/seed1; cp -r runs/long_s2_stage1 runs/seed1; cp runs/long_s2_stage1_ckpt.pt runs/seed1_ckpt.pt
fi
exec .venv/bin/python jobs/train_lvlm_v2.py --clip runs/chain_full/clip --output runs/seed1 --ckpt runs/seed1_ckpt.pt \
  --preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2 --stage2-steps 4000 --seed 1 \
  --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --question-weights count=3,exist=1.5,shape=1.5 \
  --shape-grounding 1 --gather-sup 1 --search-weight 2 --row-gather 1 --shape-phase 600 --resume
