#!/usr/bin/env bash
# session 29: does a short tail after the chain's stage 2 read count better? From the bf16 one-go chain's LVLM
# (runs/chain, stage 2 step 4000, with its optimizer state), 600 more steps of the chain's own stage-2 flags with
# the cosine extended to 4600 and a peak of 2e-3 (lr 2.8e-4 falling to its 2e-4 floor, the regime of the
# shipped LVLM's session-12 count run; the chain's own 1e-3 peak would give 1.4e-4 falling to 1e-4), once with
# the chain's question weights (the control: more steps alone) and once with count drawn twice as often
# (count=6). Then all three on 1000 fresh val items (seed 77, 200 per type), as the shipped LVLM's checkpoints
# were chosen.
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
R=docs/reports/proving-ground-v2/chain_count_tail
FLAGS="--preset default --stage1-steps 750 --eval-every 300 --ckpt-every 300 --threads 2 --stage2-steps 4600
  --drop-visual 0.8 --shuffle-visual 1.0 --cell-weight 2 --cell-grounding 1 --shape-grounding 1 --gather-sup 1
  --search-weight 2 --row-gather 1 --shape-phase 600 --autocast auto --resume --lr 2e-3"
tail_run() {  # name, question weights
  local w=runs/count_tail_$1
  if [ ! -f $w/lvlm/training_log.json ]; then  # a fresh copy of the chain's LVLM and checkpoint
    rm -rf $w && mkdir -p $w && cp -r runs/chain/lvlm $w/lvlm && cp runs/chain/lvlm_ckpt.pt $w/lvlm_ckpt.pt
  fi
  .venv/bin/python jobs/train_lvlm_v2.py --clip runs/chain/clip --output $w/lvlm --ckpt $w/lvlm_ckpt.pt $FLAGS \
      --question-weights "$2"
  cp $w/lvlm/training_log.json $R/lvlm_tail_$1_training_log.json
}
tail_run control count=3,exist=1.5,shape=1.5
tail_run count6 count=6,exist=1.5,shape=1.5
for m in chain:runs/chain/lvlm control:runs/count_tail_control/lvlm count6:runs/count_tail_count6/lvlm; do
  .venv/bin/python jobs/eval_lvlm.py --world v2 --model ${m#*:} --clip runs/chain/clip --split val --seed 77 \
      --per-type 200 --methods "" --json $R/val_seed77_1000_${m%%:*}.json
done
