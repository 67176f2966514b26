#!/usr/bin/env bash
# Installs (if needed), lints and runs the whole test suite. `.ci/run` calls exactly this.
# Arguments go to pytest; without any (the whole suite), the numerics tests then run again under each other ATen CPU
# kernel set the machine has (launch/test_numerics.sh: default, avx2, avx512).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
python3 -m ruff check src tests
python3 -m ruff format --check src tests
# pytest exits 5 when it collects no test: that is a failure here, as is any other non-zero code.
python3 -m pytest tests -q "$@"
if [ "$#" -eq 0 ]; then
    KILN_NUMERICS_SKIP_NATIVE=1 bash launch/test_numerics.sh
fi
