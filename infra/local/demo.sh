#!/usr/bin/env bash
# `make demo`: start the local cluster, submit the main job with no arguments (the embedded default:
# the bundled Shapes v2 demo shards, the shipped models/shapes_v2, accm at 87.5% pruning), print the summary, stop.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
cd "$REPO"
export ACCM_LOCAL_DIR="${ACCM_LOCAL_DIR:-/tmp/accm-demo-${USER:-$(id -u)}}"
OUT="${ACCM_DEMO_OUTPUT:-$REPO/out/demo}"

bash infra/local/start.sh > /dev/null
trap 'bash infra/local/stop.sh' EXIT
# shellcheck disable=SC1091
source "$ACCM_LOCAL_DIR/env.sh"

# The entrypoint runs in the uploaded copy of the repo; the venv is not uploaded (excluded, 2 GB), so the
# interpreter is the venv's by absolute path (same machine). Only the output location is given, so that
# the result lands in this checkout rather than in Ray's per-job directory.
"$VENV/bin/ray" job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", "out", "tmp", "**/__pycache__", ".pytest_cache", ".ruff_cache"]}' \
  -- "$VENV/bin/python" jobs/caption_dataset.py --output "$OUT" "$@"

echo
echo "summary: $OUT/summary.json"
"$VENV/bin/python" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"items={s['items']} errors={s['errors']} accuracy={s['accuracy']} method={s['method']} "
      f"flops/item={s['flops_mean_per_item'].get('flops_total')} saving={s['flops_saving']} items/s={s['items_per_s']}")
PY
