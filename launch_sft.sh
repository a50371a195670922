#!/usr/bin/env bash
# Starts the SFT trainer for relay-trainer's worker, which sets RELAY_* (see README.md).
# With $SLIME_SFT_CMD set, that command runs (it should include $RELAY_SLIME_ARGS and
# --save-interval); otherwise the built-in deterministic mock trainer.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Nodes 1..N-1 of a run on several nodes only lend their GPUs to node 0's Ray cluster, whose
# command trains (docs/slime.md, "Several nodes"); $SLIME_MEMBER_CMD replaces this default.
if [[ "${RELAY_NODE_RANK:-0}" != 0 ]]; then
  export PYTHONUNBUFFERED=1
  # `ray start --address` gives up after ~20 s, and node 0 starts its head only after its restore
  # and once every node joined: wait for the head's port first (the worker ends the wait with
  # the epoch).
  head="${RELAY_MASTER_ADDR}:${RELAY_RAY_PORT:-6379}"
  echo "launch script: waiting for node 0's Ray at $head"
  until (exec 3<>"/dev/tcp/${RELAY_MASTER_ADDR}/${RELAY_RAY_PORT:-6379}") 2>/dev/null; do sleep 2; done
  if [[ -n "${SLIME_MEMBER_CMD:-}" ]]; then
    exec bash -c "$SLIME_MEMBER_CMD"
  fi
  exec ray start --address "$RELAY_MASTER_ADDR:${RELAY_RAY_PORT:-6379}" --node-ip-address "$RELAY_NODE_IP" \
    --num-gpus "$RELAY_NUM_GPUS" --disable-usage-stats --block
fi

if [[ -z "${SLIME_SFT_CMD:-}" ]]; then
  exec "${RELAY_PYTHON:-python3}" "$here/relay.py" mock-trainer
fi

# The command starts its own Ray cluster as slime's scripts do (README, "slime"): its job API
# on 127.0.0.1:$RELAY_RAY_DASHBOARD_PORT, its job submitted as $RELAY_RAY_JOB_ID.
export RELAY_RAY_DASHBOARD_PORT="${RELAY_RAY_DASHBOARD_PORT:-8265}"
export PYTHONUNBUFFERED=1  # as slime's scripts: the trainer's lines reach the worker as printed
export RELAY_RAY_JOB_ID="relay-${RELAY_RUN_ID:-run}-${RELAY_LEASE_EPOCH:-0}-$$"

# On SIGTERM the worker signals this script alone and waits: slime's own stop step runs first,
# against this trainer's cluster while it is still whole (relay.py stop-ray-job says how).
stop_slime() {
  trap - TERM INT
  "${RELAY_PYTHON:-python3}" "$here/relay.py" stop-ray-job || true
  kill -TERM "$trainer" 2>/dev/null || true
  exit 143
}
trap stop_slime TERM INT
bash -c "${SLIME_SFT_CMD}" &
trainer=$!
wait "$trainer"
