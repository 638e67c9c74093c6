#!/usr/bin/env bash
# session 29: the bf16 one-go chain's models (runs/chain) at every ACCM rate on val (seed 0) and, once, on the
# two test seeds; the LVLM's plain-pruner table on test seed 4242
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
w=runs/chain
R=docs/reports/proving-ground-v2/chain_bf16_one_go
run() {  # split, seed, output stem
  .venv/bin/python jobs/train_accm.py --world v2 --lvlm $w/lvlm --clip $w/clip --captioner $w/captioner \
    --selector $w/selector --storage $w/ray --threads 2 --stage eval --eval-split $1 --eval-seed $2 --eval-n 500 \
    --eval-rates 0.5,0.75,0.875,0.9375 --eval-out $3
}
run val 0 $R/accm_val_rates
for s in 4242 9001; do run test $s $R/accm_test_rates_seed$s; done
.venv/bin/python jobs/eval_lvlm.py --world v2 --model $w/lvlm --clip $w/clip \
    --methods random,visionzip,prumerge_plus,divprune,cdpruner,fastv,dart --seed 4242 --per-type 100 \
    --json $R/lvlm_test_seed4242_500.json --markdown $R/lvlm_test_seed4242_500.md
