#!/usr/bin/env bash
# Container start on a Lium pod.  Keeps SSH working (Lium runs every command over SSH) and,
# when the pod's volume holds a run config, starts the worker: a host reboot restarts the
# container but not the processes started by `lium exec`, so the relay resumes from here.
set -euo pipefail

if [[ -n "${PUBLIC_KEY:-}" ]]; then
  mkdir -p /root/.ssh
  chmod 700 /root/.ssh
  grep -qxF "$PUBLIC_KEY" /root/.ssh/authorized_keys 2>/dev/null || echo "$PUBLIC_KEY" >> /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
fi

config="${RELAY_CONFIG:-/mnt/relay/run.yaml}"
if [[ -f "$config" ]]; then
  # Secrets (RELAY_SHARED_SECRET, HF_TOKEN) live in a 0600 file beside the config, never on
  # a command line.
  secrets_file="$(dirname "$config")/relay.env"
  if [[ -f "$secrets_file" ]]; then
    set -a
    # shellcheck disable=SC1090
    . "$secrets_file"
    set +a
  fi
  log="${RELAY_LOG:-$(dirname "$config")/worker.log}"
  nohup setsid python3 /opt/relay/relay.py worker "$config" >>"$log" 2>&1 </dev/null &
  echo "relay worker started from $config (log: $log)"
fi

exec "$@"
