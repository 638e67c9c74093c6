#!/usr/bin/env bash
# the chain-with-phase models on the test seeds, once (ACCM ablation on 4242 and 9001; LVLM pruner table on 4242)
set -euo pipefail
w=runs/chain_phase
for s in 4242 9001; do
  .venv/bin/python jobs/train_accm.py --world v2 --lvlm $w/lvlm --clip $w/clip --captioner $w/captioner \
    --selector $w/selector --storage $w/ray --threads 2 --stage eval --eval-split test --eval-seed $s --eval-n 500 \
    --eval-out $w/accm_test_ablation_seed$s
done
.venv/bin/python jobs/eval_lvlm.py --world v2 --model $w/lvlm --clip $w/clip \
    --methods random,visionzip,prumerge_plus,divprune,cdpruner,fastv,dart --seed 4242 --per-type 100 \
    --json $w/lvlm_test_seed4242_500.json --markdown $w/lvlm_test_seed4242_500.md
