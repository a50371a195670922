#!/usr/bin/env bash
# Install everything the tests need: Python packages (the real huggingface_hub, lium.io CLI and
# Ray among them) and, where apt-get is available as root, Debian's openssh-server (pods the real
# lium CLI reaches over SSH) and chromium (the status-page browser test). A test whose system
# package could not be installed skips and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null 2>&1 \
      || echo "note: could not install ${missing[*]}; the tests that need them will skip"
  else
    echo "note: ${missing[*]} not installed (needs root and apt-get); the tests that need them will skip"
  fi
fi
