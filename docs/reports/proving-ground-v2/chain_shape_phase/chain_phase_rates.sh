#!/usr/bin/env bash
# chain_phase_rates.sh (session 23), the chain-with-phase models: ACCM at 50 / 75 / 87.5% pruning (is it monotone in the budget?) on val (seed 0,
# the chain's own eval stage's items) and on the two test seeds
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
w=runs/chain_phase
run() {  # split, seed, output stem
  .venv/bin/python jobs/train_accm.py --world v2 --lvlm $w/lvlm --clip $w/clip --captioner $w/captioner \
    --selector $w/selector --storage $w/ray --threads 2 --stage eval --eval-split $1 --eval-seed $2 --eval-n 500 \
    --eval-rates 0.5,0.75,0.875 --eval-out $3
}
run val 0 $w/accm_val_rates
for s in 4242 9001; do run test $s $w/accm_test_rates_seed$s; done
