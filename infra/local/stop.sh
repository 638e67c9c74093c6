#!/usr/bin/env bash
# Stop exactly what infra/local/start.sh started: the process groups of the pids it recorded, then any
# leftover process whose command line names this cluster's own temp dir. Never `ray stop` (that would end
# every Ray instance on the machine, other users' included).
set -uo pipefail

DIR="${ACCM_LOCAL_DIR:-/tmp/accm-local-${USER:-$(id -u)}}"
[[ -f "$DIR/pids" ]] || { echo "no local cluster recorded in $DIR" >&2; exit 0; }

alive_any() { for p in "$@"; do kill -0 -- "-$p" 2>/dev/null && return 0; done; return 1; }

mapfile -t PIDS < <(awk '{print $2}' "$DIR/pids")
for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done   # whole group: setsid made pid the pgid
for _ in $(seq 1 30); do alive_any "${PIDS[@]}" || break; sleep 0.5; done
for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done

# Ray may start helpers in their own sessions; they all carry our unique --temp-dir in their arguments.
for pid in $(pgrep -f -- "$DIR/ray" || true); do
  [[ "$pid" == "$$" ]] || kill -KILL "$pid" 2>/dev/null
done
rm -f "$DIR/pids"
echo "local cluster in $DIR stopped" >&2
