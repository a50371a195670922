#!/usr/bin/env bash
# Starts the SFT trainer for relay-trainer's worker, which sets RELAY_* (see README.md).
# With $SLIME_SFT_CMD set, that command runs (it should include $RELAY_SLIME_ARGS and
# --save-interval); otherwise the built-in deterministic mock trainer.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -z "${SLIME_SFT_CMD:-}" ]]; then
  exec "${RELAY_PYTHON:-python3}" "$here/relay.py" mock-trainer
fi

# The command starts its own Ray cluster as slime's scripts do (README, "slime"): its job API
# on 127.0.0.1:$RELAY_RAY_DASHBOARD_PORT, its job submitted as $RELAY_RAY_JOB_ID.
export RELAY_RAY_DASHBOARD_PORT="${RELAY_RAY_DASHBOARD_PORT:-8265}"
export RELAY_RAY_JOB_ID="relay-${RELAY_RUN_ID:-run}-${RELAY_LEASE_EPOCH:-0}-$$"

# On SIGTERM the worker signals this script alone and waits: slime's own stop steps run
# first, against this trainer's cluster while it is still whole, each with a timeout (a
# dying cluster makes the ray CLI hang).  The job is stopped through Ray's job REST API, what
# `ray job stop` calls, because the CLI alone takes 2-5 s to start on a busy machine; then
# `ray stop --force`.  The worker then ends what is left (the submit client, SGLang servers).
stop_slime() {
  trap - TERM INT
  "${RELAY_PYTHON:-python3}" - "http://127.0.0.1:$RELAY_RAY_DASHBOARD_PORT/api/jobs/$RELAY_RAY_JOB_ID" 2>/dev/null <<'PY' || true
import json, sys, time, urllib.request
job = sys.argv[1]
urllib.request.urlopen(urllib.request.Request(job + "/stop", method="POST"), timeout=2)
give_up = time.monotonic() + 4  # Ray sends the driver SIGTERM, then SIGKILL after 3 s
while time.monotonic() < give_up:
    if json.load(urllib.request.urlopen(job, timeout=2)).get("status") in ("STOPPED", "SUCCEEDED", "FAILED"):
        break
    time.sleep(0.2)
PY
  if command -v ray >/dev/null 2>&1; then
    timeout 5 ray stop --force >/dev/null 2>&1 || true
  fi
  kill -TERM "$trainer" 2>/dev/null || true
  exit 143
}
trap stop_slime TERM INT
bash -c "${SLIME_SFT_CMD}" &
trainer=$!
wait "$trainer"
