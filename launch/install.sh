#!/usr/bin/env bash
# Installs Kiln and its dependencies into the Python that launch/python.sh picks: the active virtual environment,
# or else the project's .venv (created here on first use), never a system Python. On a machine without a GPU the
# CPU build of torch 2.13.0 is installed first, so that no CUDA packages are downloaded. Set KILN_EXTRAS=dev,flash
# for extras, PYTHON to install into a given interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/python.sh
source launch/python.sh
PY=$(kiln_python)
echo "installing Kiln into $PY"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[${KILN_EXTRAS:-dev}]"
