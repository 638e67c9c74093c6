#!/usr/bin/env bash
# chain_bf16_seed0 (session 27): the chain's stages 3-6 as jobs/reproduce_v2.py runs them today (stage 2 under
# --autocast auto, the chain's own seed 0), one attempt each, nothing else on the machine. The CLIP and stage 1 are
# the chain's own (jobs/reproduce_v2.py --stages clip,lvlm-stage1: byte-identical on every run); here they were
# copied from session 26's build of them, so the chain log times only the later stages.
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [ ! -f runs/chain_bf16/lvlm_ckpt.pt ]; then
  .venv/bin/python jobs/reproduce_v2.py --workdir runs/chain_bf16 --stages clip,lvlm-stage1
fi
exec .venv/bin/python jobs/reproduce_v2.py --workdir runs/chain_bf16
