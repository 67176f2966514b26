#!/usr/bin/env bash
# Installs (if needed, into the active virtual environment or the project's .venv), lints and runs the whole test
# suite. `.ci/run` calls exactly this.
# Arguments go to pytest; without any (the whole suite), the single-process numerics tests then run again under each
# other ATen CPU kernel set the machine has (launch/test_numerics.sh: default, avx2, avx512; run that script alone
# for the multi-process parity tests under each too).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/python.sh
source launch/python.sh
PYTHON=$(kiln_python)  # the active virtual environment, else the project's .venv (launch/python.sh)
export PYTHON          # install.sh and test_numerics.sh use the same one
bash launch/install.sh
"$PYTHON" -m ruff check src tests
"$PYTHON" -m ruff format --check src tests
# Two pytest workers (pytest-xdist, KILN_TEST_WORKERS; 0: one process), each given whole files so that a file's
# fixtures are built once: one process leaves about 30% of 2 cores idle while processes start, import and wait.
workers=()
if [ "${KILN_TEST_WORKERS:-2}" -gt 0 ]; then
    workers=(-n "${KILN_TEST_WORKERS:-2}" --dist loadfile)
fi
# --durations: the 20 slowest tests are listed, so a slower run says where its time went.
# pytest exits 5 when it collects no test: that is a failure here, as is any other non-zero code.
"$PYTHON" -m pytest -q --durations=20 "${workers[@]}" "$@"  # testpaths (pyproject.toml) is tests/ unless a path is given
if [ "$#" -eq 0 ]; then
    KILN_NUMERICS_SKIP_NATIVE=1 KILN_NUMERICS_MARK="numerics and not dist" bash launch/test_numerics.sh
fi
