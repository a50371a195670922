#!/usr/bin/env bash
# Starts the SFT trainer for relay-trainer's worker, which sets RELAY_* (see README.md).
# With $SLIME_SFT_CMD set, that command runs (it should include $RELAY_SLIME_ARGS and
# --save-interval); otherwise the built-in deterministic mock trainer.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -z "${SLIME_SFT_CMD:-}" ]]; then
  exec "${RELAY_PYTHON:-python3}" "$here/relay.py" mock-trainer
fi

# slime's training runs outside this process group (Ray starts the driver in a new session),
# so a stop also runs slime's own stop steps.  The worker then kills every process that
# inherited this trainer's RELAY_TRAINER_TAG, the Ray daemons and SGLang servers included.
stop_slime() {
  trap - TERM INT
  if command -v ray >/dev/null 2>&1; then
    ray job list 2>/dev/null | grep -o "raysubmit_[A-Za-z0-9]*" | sort -u | while read -r job; do
      timeout 10 ray job stop "$job" >/dev/null 2>&1 || true
    done
    timeout 20 ray stop --force >/dev/null 2>&1 || true
  fi
  kill -TERM "$trainer" 2>/dev/null || true
  wait "$trainer" 2>/dev/null || true
  exit 143
}
trap stop_slime TERM INT
bash -c "${SLIME_SFT_CMD}" &
trainer=$!
wait "$trainer"
