#!/usr/bin/env bash
# Starts the RL trainer for relay-trainer's worker, which sets RELAY_* (see README.md).
# With $SLIME_RL_CMD set, that command runs (add $RELAY_SLIME_ARGS to it); otherwise
# the built-in deterministic mock trainer.  exec, so the worker's signals reach the trainer.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${SLIME_RL_CMD:-}" ]]; then
  exec bash -c "${SLIME_RL_CMD}"
fi
exec "${RELAY_PYTHON:-python3}" "$here/relay.py" mock-trainer
