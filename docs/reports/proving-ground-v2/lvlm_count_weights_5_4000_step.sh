#!/usr/bin/env bash
# lvlm_count_weights_5_4000_step.sh (run as runs/count5.sh): the chain's 4000-step stage 2 with the shape phase (runs/phase4000.sh) and count questions drawn more often
# (count=5,exist=2,shape=1.5,spatial=1.5 against count=3,exist=1.5,shape=1.5), from the chain's stage 1; resumable
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [ ! -f runs/count5_ckpt.pt ]; then
  rm -rf runs/count5; cp -r runs/long_s2_stage1 runs/count5; cp runs/long_s2_stage1_ckpt.pt runs/count5_ckpt.pt
fi
exec .venv/bin/python jobs/train_lvlm_v2.py --clip runs/chain_full/clip --output runs/count5 --ckpt runs/count5_ckpt.pt \
  --preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2 --stage2-steps 4000 \
  --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --question-weights count=5,exist=2,shape=1.5,spatial=1.5 \
  --shape-grounding 1 --gather-sup 1 --search-weight 2 --row-gather 1 --shape-phase 600 --resume
