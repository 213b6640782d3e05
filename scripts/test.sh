#!/usr/bin/env bash
# Install (if needed), lint the Dockerfile, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/lint_dockerfile.sh
exec python3 -m pytest -q "$@"
