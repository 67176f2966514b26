#!/usr/bin/env bash
# Installs (if needed), lints and runs the whole test suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
python3 -m ruff check src tests
python3 -m ruff format --check src tests
# pytest exits 5 when it collects no test: that is a failure here, as is any other non-zero code.
python3 -m pytest tests -q "$@"
