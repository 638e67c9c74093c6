#!/usr/bin/env bash
# runs/long_s2.sh: the chain's LVLM on the chain's own CLIP (runs/chain_full/clip), stage 1 as the chain, stage 2
# with the chain's flags but a 4000-step cosine instead of 2200 (resumable: run again after an interruption)
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
base=(jobs/train_lvlm_v2.py --clip runs/chain_full/clip --output runs/long_s2 --ckpt runs/long_s2_ckpt.pt
      --preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2)
if [ ! -f runs/long_s2_stage1.done ]; then
  r=(); [ -f runs/long_s2_ckpt.pt ] && r=(--resume)
  .venv/bin/python "${base[@]}" --stage2-steps 0 "${r[@]}"
  touch runs/long_s2_stage1.done
  cp -r runs/long_s2 runs/long_s2_stage1; cp runs/long_s2_ckpt.pt runs/long_s2_stage1_ckpt.pt
fi
exec .venv/bin/python "${base[@]}" --stage2-steps 4000 --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 \
  --cell-grounding 1 --question-weights count=3,exist=1.5,shape=1.5 --shape-grounding 1 --gather-sup 1 \
  --search-weight 2 --row-gather 1 --resume
