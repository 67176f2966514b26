#!/usr/bin/env bash
# Everything that needs one CUDA GPU (H100 or H200), in one command sized for a 10-minute lease (about 5 min):
#   1. tests/test_gpu.py: every attention backend against fp32 SDPA at lengths not divisible by 128, the model in
#      fp32 and bf16, a training step that never waits for the GPU, and the real entry point on CUDA (one process
#      group over NCCL + gloo, ZeRO-3 bf16, save and resume);
#   2. python -m src.bench, Kiln against the diffusers baseline: 1.3B model at 256px x 129 frames (8,448 video + 512
#      text tokens), with a profile; and at 384px x 129 frames (19,008 + 512), every block checkpointed in both;
#      then the engines at 8.4k tokens on the one GPU: ZeRO-3 and FSDP2 (bf16), each in one run of the same loop;
#   3. python -m src.gpu_report: device, driver, library versions, date, test results, the speed table and the
#      profile, written into docs/BENCHMARKS.md between its markers; the JSON beside it (bench_speed_gpu_*.json).
#
#   bash launch/gpu_checks.sh             # on the GPU machine, from a checkout with Kiln installed (or the image)
#   bash launch/gpu_checks.sh --dry-run   # the same steps on the CPU at tiny shapes (CI: tests/test_gpu_checks.py)
#
# --dry-run writes into a copy of the page ($OUT/BENCHMARKS.md) and leaves docs/ alone. Results and the whole log go
# to OUT (default outputs/gpu_checks, or outputs/gpu_checks_dry). Each step has a time limit, and no step starts
# once BUDGET_S (default 480) seconds have passed (it is recorded with status 125); a failing step does not stop
# the others, and the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
dry=0
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
if [ $# -gt 0 ]; then
    echo "usage: bash launch/gpu_checks.sh [--dry-run]" >&2
    exit 2
fi

if [ "$dry" = 1 ]; then
    out=${OUT:-outputs/gpu_checks_dry}
    doc=$out/BENCHMARKS.md
    bench=(--model mmdit_tiny --text-tokens 8 --batch 1 --steps 4 --log-every 2)
    shape8k=(--latent 2 8 8)
    shape19k=(--latent 2 8 12)
    profile=1
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
    out=${OUT:-outputs/gpu_checks}
    doc=docs/BENCHMARKS.md
    bench=(--model mmdit_1b --text-tokens 512 --batch 1 --steps 20 --log-every 5)
    shape8k=(--latent 33 32 32)
    shape19k=(--latent 33 48 48)
    profile=3
fi
budget=${BUDGET_S:-480}
mkdir -p "$out"
rm -f "$out/log" "$out/steps.tsv" "$out/gpu_tests.xml" "$out"/speed_*.json
status=0

# step NAME LIMIT_S COMMAND...: run it with its log appended to $out/log; record NAME, exit status, seconds
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -le 0 ]; then
        echo "== $name: not started, the ${budget} s budget is spent" | tee -a "$out/log"
        printf '%s\t125\t0\n' "$name" >>"$out/steps.tsv"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/log"
    local start=$SECONDS rc
    timeout "$limit" "$@" >>"$out/log" 2>&1
    rc=$?
    printf '%s\t%d\t%d\n' "$name" "$rc" "$((SECONDS - start))" >>"$out/steps.tsv"
    tail -n 15 "$out/log"
    if [ "$rc" -ne 0 ]; then
        echo "== $name failed ($rc)" | tee -a "$out/log"
        status=1
    fi
}

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/log"
fi
step "GPU tests" 240 "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider --junitxml="$out/gpu_tests.xml"
step "speed at 8.4k tokens, profiled" 180 "$PY" -m src.bench "${bench[@]}" "${shape8k[@]}" --profile "$profile" \
    --json "$out/speed_8k.json"
step "speed at 19k tokens, every block checkpointed" 180 "$PY" -m src.bench "${bench[@]}" "${shape19k[@]}" \
    --baseline-checkpointing --json "$out/speed_19k.json" parallel.checkpoint_double=-1 parallel.checkpoint_single=-1
step "engines at 8.4k tokens: ZeRO-3 and FSDP2" 150 "$PY" -m src.bench "${bench[@]}" "${shape8k[@]}" \
    --engines zero3:1 fsdp2:1 --no-baseline --json "$out/speed_engines.json"
if [ "$dry" = 1 ]; then
    cp docs/BENCHMARKS.md "$doc"
else
    for shape in 8k 19k engines; do
        [ ! -f "$out/speed_$shape.json" ] || cp "$out/speed_$shape.json" "docs/bench_speed_gpu_$shape.json"
    done
fi
"$PY" -m src.gpu_report "$out" "$doc" || status=1
exit "$status"
