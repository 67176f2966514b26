#!/usr/bin/env bash
# Installs Kiln and its dependencies into the current Python. On a machine without a GPU the CPU build of
# torch 2.13.0 is installed first, so that no CUDA packages are downloaded. Set KILN_EXTRAS=dev,flash for extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[${KILN_EXTRAS:-dev}]"
