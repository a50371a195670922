#!/usr/bin/env bash
# Install relay's own Python packages into a folder of its own, RELAY_DIR/site, which relay.py
# puts first on its own import path.  Never into the trainer's Python: slime's image pins its
# packages (transformers 5.12.1 requires huggingface_hub >= 1.5, < 2 and checks it at import),
# and the trainer never sees this folder (it is not on PYTHONPATH).  The Dockerfile runs this;
# so does CI (.ci/hub_compat), against a Python that has slime's transformers.
#   PYTHON=python3 RELAY_DIR=/opt/relay docker/install_relay.sh
set -euo pipefail
python="${PYTHON:-python3}"
site="${RELAY_DIR:-/opt/relay}/site"
# --no-warn-conflicts: pip would compare site/ with the trainer's packages (transformers pins
# huggingface_hub < 2) as if they shared one path; they never do.
"$python" -m pip install --quiet --no-cache-dir --disable-pip-version-check --no-warn-conflicts --target "$site" \
  "pyyaml==6.0.3" "huggingface_hub==2.4.0"
