#!/usr/bin/env bash
# session 29: the kept-context option (the caption model also reads the kept patches; the project's option, not
# ACCM's input) on the 3-hour chain's models: the recipe of models/shapes_v2/captioner_kept_context (steps 1-3b,
# 2 beams) from the chain's own caption model, against the chain's LVLM and CLIP (runs/chain, the bf16 one-go run).
# Then the ablation at every rate on val (seed 0) and, once, on the two test seeds.
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
c=runs/chain
w=runs/chain_kc
R=docs/reports/proving-ground-v2/chain_kept_context
ACCM="--world v2 --lvlm $c/lvlm --clip $c/clip --threads 2 --storage $w/ray"
PRE="--stage pretrain --pretrain-steps 1000 --batch-size 32 --ckpt-every 250 --pretrain-keep 9-72
  --pretrain-targets abstain --lr-mapper 5e-4 --lr-decoder 5e-4"
mkdir -p $w
# 1. count items only, the kept context switched on (its flag column starts at zero), 1200 steps
[ -d $w/count_ft ] || .venv/bin/python jobs/diagnose_count.py caption-finetune --kept-context --steps 1200 \
    --lvlm $c/lvlm --clip $c/clip --captioner $c/captioner --json $R/count_caption_finetune_val.json --out $w/count_ft
# 2. every question type, count drawn 2x, abstention targets, 1000 steps
[ -d $w/s2/captioner ] || { mkdir -p $w/s2 && cp -r $w/count_ft $w/s2/captioner; }
.venv/bin/python jobs/train_accm.py $ACCM $PRE --name chain-kc-s2 --pretrain-question-weights count=2 \
    --captioner $w/s2/captioner --selector $w/s2/selector_pre
# 3. 1000 steps more, types drawn uniformly
[ -d $w/s3/captioner ] || { mkdir -p $w/s3 && cp -r $w/s2/captioner $w/s3/captioner; }
.venv/bin/python jobs/train_accm.py $ACCM $PRE --name chain-kc-s3 --captioner $w/s3/captioner \
    --selector $w/s3/selector_pre
# 3b. the ACCM stage against the chain's LVLM (600 steps), then 2 beams
[ -d $w/pair/captioner ] || { mkdir -p $w/pair && cp -r $w/s3/captioner $w/pair/captioner; }
.venv/bin/python jobs/train_accm.py $ACCM --stage accm --accm-steps 600 --ckpt-every 100 --name chain-kc-accm \
    --accm-reference answer --captioner $w/pair/captioner --selector $w/pair/selector --selector-text $c/clip \
    --selector-arch '{"template": "{q} {c}", "share_prefix": true}'
sed -i 's/"beams": 3/"beams": 2/' $w/pair/captioner/accm_captioner.json
run() {  # split, seed, output stem
  .venv/bin/python jobs/train_accm.py $ACCM --captioner $w/pair/captioner --selector $w/pair/selector \
    --stage eval --eval-split $1 --eval-seed $2 --eval-n 500 --eval-rates 0.5,0.75,0.875,0.9375 --eval-out $3
}
run val 0 $R/accm_val_rates
for s in 4242 9001; do run test $s $R/accm_test_rates_seed$s; done
