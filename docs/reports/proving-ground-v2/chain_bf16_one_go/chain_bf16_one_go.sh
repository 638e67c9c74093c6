#!/usr/bin/env bash
# chain_bf16_one_go (session 28): the whole chain as jobs/reproduce_v2.py runs it today (stage 2 under
# --autocast auto), from nothing, in one go: no runs/chain before it, one attempt per stage, nothing else on the
# 2-core machine. chain_log.json there has every stage's command and minutes. Run again after an interruption:
# finished stages are skipped and the interrupted one resumes (its minutes then count every attempt).
set -euo pipefail
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python jobs/reproduce_v2.py --workdir runs/chain
