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

# On SIGTERM the worker signals this script alone and waits: slime's own stop step runs first,
# against this trainer's cluster while it is still whole, with timeouts (a dying cluster makes
# Ray's CLI hang).  The job is stopped through Ray's job REST API, what `ray job stop` calls:
# the CLI alone takes 2-5 s to start on a busy machine.  `ray stop --force` is left out: it
# kills every Ray process on the machine, not this cluster's, and the worker SIGKILLs exactly
# this trainer's processes next (Ray's daemons, the submit client, SGLang servers).
stop_slime() {
  trap - TERM INT
  "${RELAY_PYTHON:-python3}" - "http://127.0.0.1:$RELAY_RAY_DASHBOARD_PORT/api/jobs/$RELAY_RAY_JOB_ID" 2>/dev/null <<'PY' || true
import json, sys, time, urllib.request
job, status = sys.argv[1], "?"
urllib.request.urlopen(urllib.request.Request(job + "/stop", method="POST"), timeout=2)
give_up = time.monotonic() + 4  # Ray sends the driver SIGTERM, then SIGKILL after 3 s
while time.monotonic() < give_up and status not in ("STOPPED", "SUCCEEDED", "FAILED"):
    time.sleep(0.2)
    status = json.load(urllib.request.urlopen(job, timeout=2)).get("status")
print(f"launch script: Ray job {job.rsplit('/', 1)[1]} is {status}", flush=True)
PY
  kill -TERM "$trainer" 2>/dev/null || true
  exit 143
}
trap stop_slime TERM INT
bash -c "${SLIME_SFT_CMD}" &
trainer=$!
wait "$trainer"
