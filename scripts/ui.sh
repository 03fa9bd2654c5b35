#!/usr/bin/env bash
# `make ui`: a local Prefect server on 127.0.0.1, the runbook's deployments from prefect.yaml, and a
# process worker, so a person can open the UI and click "Run". Ctrl-C stops the server and the worker.
#
#   PREFECT_UI_PORT   port of the UI/API (default 4200, or a free one when 4200 is taken)
#   PREFECT_HOME      where the server keeps its database (Makefile: .cache/prefect)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PREFECT=.venv/bin/prefect
POOL=sdxl-runbook
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.cache/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p "$PREFECT_HOME"

port_is_free() { "$PY" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
PORT="${PREFECT_UI_PORT:-4200}"
if ! port_is_free "$PORT"; then
  [ -n "${PREFECT_UI_PORT:-}" ] && { echo "port $PORT is in use" >&2; exit 1; }
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

# Each child runs in its own process group (setsid); on exit we signal those groups by their PIDs:
# TERM, and KILL for whatever still runs 10 s later.
pids=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -s TERM -- "-$pid" 2>/dev/null || true; done
  (sleep 10; for pid in "${pids[@]}"; do kill -s KILL -- "-$pid" 2>/dev/null || true; done) &
  local killer=$!
  wait "${pids[@]}" 2>/dev/null || true
  kill "$killer" 2>/dev/null || true
  echo "stopped the Prefect server and worker"
}
trap stop_all EXIT INT TERM

echo "starting the Prefect server on 127.0.0.1:$PORT (log: $PREFECT_HOME/server.log) ..."
setsid "$PREFECT" server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 240); do
  "$PY" -c 'import httpx, sys; sys.exit(httpx.get(sys.argv[1], timeout=2).status_code != 200)' \
    "$PREFECT_API_URL/health" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "the server exited; see $PREFECT_HOME/server.log" >&2; exit 1; }
  sleep 0.5
done

"$PREFECT" work-pool create "$POOL" --type process --overwrite >/dev/null
"$PREFECT" --no-prompt deploy --all

setsid "$PREFECT" worker start --pool "$POOL" &
pids+=($!)

cat <<MSG

  Prefect UI: http://127.0.0.1:$PORT
  Deployments: deploy-sdxl (dry run unless you untick dry_run), verify-sdxl, rollback-sdxl,
  deploy-fleet (dry run unless you untick dry_run; set fleet_file), regression-benchmark (nightly
  once you set its target_file and turn its schedule on). Open one, "Run" -> "Custom run", fill in
  target or target_file.
  Press Ctrl-C to stop the server and the worker.

MSG
wait
