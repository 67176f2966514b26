# shellcheck shell=bash
# Sourced by launch/install.sh, demo.sh and test.sh: which Python Kiln's scripts install into and run.
# kiln_python prints it: $PYTHON when set; python3 itself when it runs inside a virtual environment (venv,
# virtualenv) or an active conda environment; otherwise the project's virtual environment ($KILN_VENV, default
# .venv in the repository root), created on first use and reused after, so nothing is installed into a system
# Python (PEP 668: Debian 12+ and Ubuntu 23.04+ refuse with "externally-managed-environment").
# The venv sees the base Python's site-packages (--system-site-packages): what is installed there already (a
# torch build, say) is reused, the rest goes into .venv.

kiln_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
        return
    fi
    local base=python3 venv=${KILN_VENV:-.venv}
    if [ -n "${CONDA_PREFIX:-}" ] || "$base" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        command -v "$base"
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating the project virtual environment $venv (python3 is not inside one)" >&2
        # Debian/Ubuntu without python3-venv lack ensurepip: then a venv without its own pip, using the system's
        if ! "$base" -m venv --system-site-packages "$venv" 2>/dev/null; then
            rm -rf "$venv"
            if ! "$base" -m venv --system-site-packages --without-pip "$venv" >&2 ||
                ! "$venv/bin/python" -m pip --version >/dev/null; then
                rm -rf "$venv"
                echo "could not create $venv with pip in it ('$base -m venv'): on Debian/Ubuntu install" \
                    "python3-venv (apt install python3-venv), or activate a virtual environment, or set PYTHON" >&2
                return 1
            fi
        fi
    fi
    echo "$(cd "$venv" && pwd)/bin/python"
}
