#!/usr/bin/env bash
# runs/phase4000.sh: the chain's 4000-step stage 2 (LVLM_STAGE2's flags) from the chain's stage 1
# (runs/long_s2_stage1*, on runs/chain_full/clip) with --shape-phase 600; resumable
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [ ! -f runs/phase4000_ckpt.pt ]; then
  rm -rf runs/phase4000; cp -r runs/long_s2_stage1 runs/phase4000; cp runs/long_s2_stage1_ckpt.pt runs/phase4000_ckpt.pt
fi
exec .venv/bin/python jobs/train_lvlm_v2.py --clip runs/chain_full/clip --output runs/phase4000 --ckpt runs/phase4000_ckpt.pt \
  --preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2 --stage2-steps 4000 \
  --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --question-weights count=3,exist=1.5,shape=1.5 \
  --shape-grounding 1 --gather-sup 1 --search-weight 2 --row-gather 1 --shape-phase 600 --resume
