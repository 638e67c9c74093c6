#!/usr/bin/env bash
# lvlm_bf16_stage2_seed1.sh (ran as runs/bf16s1.sh, session 26): the chain's 4000-step stage 2 (shape phase 600) with --seed 1 (stage 2's data draws; the
# same stage 1) under bf16 autocast: session 25's bf16 run with session 23's seed; from the chain's CLIP and stage 1,
# rebuilt here by jobs/reproduce_v2.py (deterministic: byte-identical to earlier runs of the same commands); resumable
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
.venv/bin/python jobs/reproduce_v2.py --workdir runs/chain_full --stages clip,lvlm-stage1
if [ ! -f runs/bf16s1_ckpt.pt ]; then
  rm -rf runs/bf16s1; cp -r runs/chain_full/lvlm runs/bf16s1; cp runs/chain_full/lvlm_ckpt.pt runs/bf16s1_ckpt.pt
fi
exec .venv/bin/python jobs/train_lvlm_v2.py --clip runs/chain_full/clip --output runs/bf16s1 --ckpt runs/bf16s1_ckpt.pt \
  --preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2 --stage2-steps 4000 --seed 1 \
  --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --question-weights count=3,exist=1.5,shape=1.5 \
  --shape-grounding 1 --gather-sup 1 --search-weight 2 --row-gather 1 --shape-phase 600 --resume --autocast bf16
