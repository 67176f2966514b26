#!/usr/bin/env bash
# The numerics tests (pytest -m numerics: float comparisons whose rounding depends on the kernels' reduction order)
# once per ATen CPU kernel set this CPU can run: ATEN_CPU_CAPABILITY=default always, avx2 with the avx2 and fma
# flags, avx512 with avx512f/bw/vl/dq (what ATen needs for its AVX-512 kernels). Their tolerances are derived in
# tests/numerics.py, so they must hold under each. Extra arguments go to pytest. Every run must pass and collect
# at least one test: pytest's exit code 5 (nothing collected) is a failure too. launch/test.sh calls this after the
# whole suite with KILN_NUMERICS_SKIP_NATIVE=1: the kernel set torch picks unasked (the best the CPU has) has just
# run them there, so only the others run again; and with KILN_NUMERICS_MARK="numerics and not dist": the
# single-process numerics tests (the kernels themselves: model, VAEs, flow, EMA, engines), 10 s per kernel set,
# without the multi-process parity tests (5 minutes per kernel set, which run under the native set in the suite).
# Run this script directly for every numerics test under every kernel set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() {
    local f
    for f in "$@"; do
        [[ "$flags" == *" $f "* ]] || return 1
    done
}
capabilities=(default)
if has avx2 fma; then capabilities+=(avx2); fi
if has avx512f avx512bw avx512vl avx512dq fma; then capabilities+=(avx512); fi

native=$(env -u ATEN_CPU_CAPABILITY "$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
status=0
for cap in "${capabilities[@]}"; do
    if [ "${KILN_NUMERICS_SKIP_NATIVE:-0}" = 1 ] && [ "$cap" = "$native" ]; then
        echo "== ATEN_CPU_CAPABILITY=$cap: the native kernel set, run by the whole suite already"
        continue
    fi
    actual=$(ATEN_CPU_CAPABILITY=$cap "$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
    if [ "${actual,,}" != "$cap" ]; then
        echo "== ATEN_CPU_CAPABILITY=$cap: torch runs $actual instead: not this kernel set, failed" >&2
        status=1
        continue
    fi
    mark=${KILN_NUMERICS_MARK:-numerics}
    echo "== ATEN_CPU_CAPABILITY=$cap: pytest -m \"$mark\""
    rc=0
    # Each kernel set compiles into its own, new inductor cache: inductor's cache key leaves the kernel set out,
    # so a kernel generated with AVX2 vectors (at::vec) would be reused under `default` and fail to compile there
    # (test_engine's compiled-blocks test did, 2026-12-03)
    cache=$(mktemp -d)
    ATEN_CPU_CAPABILITY=$cap TORCHINDUCTOR_CACHE_DIR=$cache "$PY" -m pytest -m "$mark" -q "$@" || rc=$?
    rm -rf "$cache"
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 5 ] && echo "== ATEN_CPU_CAPABILITY=$cap: no numerics test collected" >&2
        echo "== ATEN_CPU_CAPABILITY=$cap: failed (pytest exit code $rc)" >&2
        status=1
    fi
done
exit "$status"
