#!/usr/bin/env bash
# runs/bf16.sh (session 25): the chain's 4000-step stage 2 (shape phase 600, seed 0) from the chain's stage 1 (runs/long_s2_stage1*,
# on runs/chain_full/clip), the LLM's forward and backward under bf16 autocast (--autocast bf16); resumable
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [ ! -f runs/bf16_ckpt.pt ]; then
  rm -rf runs/bf16; cp -r runs/long_s2_stage1 runs/bf16; cp runs/long_s2_stage1_ckpt.pt runs/bf16_ckpt.pt
fi
exec .venv/bin/python jobs/train_lvlm_v2.py --clip runs/chain_full/clip --output runs/bf16 --ckpt runs/bf16_ckpt.pt \
  --preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2 --stage2-steps 4000 \
  --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --question-weights count=3,exist=1.5,shape=1.5 \
  --shape-grounding 1 --gather-sup 1 --search-weight 2 --row-gather 1 --shape-phase 600 --resume --autocast bf16
