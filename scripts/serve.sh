#!/usr/bin/env bash
# Install (if needed) and serve the embedded default model on 127.0.0.1:8000.
# Extra arguments go to `neuronserve serve` (see `neuronserve serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec neuronserve serve "$@"
