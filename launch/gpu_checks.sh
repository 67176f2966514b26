#!/usr/bin/env bash
# The checks that need one CUDA GPU (H100 or H200), in one command: tests/test_gpu.py, then `python -m src.bench`
# at the target shapes (1.3B MMDiT, 256px and 384px x 129 frames, HunyuanVideo latents, patch 2). The JSON figures
# go to docs/bench_speed_gpu_*.json and the whole log to ${OUT:-outputs/gpu_checks}/log; copy the tables into
# docs/BENCHMARKS.md with the device and date. Each step has its own time limit (STEP_TIMEOUT, default 300 s), and
# a failing step does not stop the others. Kiln must be installed (launch/install.sh or the Docker image).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
out=${OUT:-outputs/gpu_checks}
mkdir -p "$out"
status=0

step() {
    echo "== $*" | tee -a "$out/log"
    timeout "${STEP_TIMEOUT:-300}" "$@" >>"$out/log" 2>&1
    local rc=$?
    tail -n 30 "$out/log"
    [ "$rc" -eq 0 ] || { echo "== failed ($rc): $*" | tee -a "$out/log"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/log"
step "$PY" -m pytest tests/test_gpu.py -q -rs
shape8k=(--model mmdit_1b --latent 33 32 32 --text-tokens 512 --batch 1 --steps 30 --log-every 5)
shape19k=(--model mmdit_1b --latent 33 48 48 --text-tokens 512 --batch 1 --steps 30 --log-every 5)
# the default engine (ZeRO-3 bf16) against diffusers' FluxTransformer2DModel, with a profile of 3 steps
step "$PY" -m src.bench "${shape8k[@]}" --profile 3 --json docs/bench_speed_gpu_8k.json
# one device without ZeRO, then the attention backends and torch.compile on it
local_bf16=(parallel=local parallel.precision=bf16)
step "$PY" -m src.bench "${shape8k[@]}" --no-baseline --profile 3 --json docs/bench_speed_gpu_8k_local.json \
    "${local_bf16[@]}"
step "$PY" -m src.bench "${shape8k[@]}" --no-baseline --json docs/bench_speed_gpu_8k_local_sdpa.json \
    "${local_bf16[@]}" model.attn_backend=sdpa
step "$PY" -m src.bench "${shape8k[@]}" --no-baseline --warmup 2 --json docs/bench_speed_gpu_8k_local_compile.json \
    "${local_bf16[@]}" parallel.compile=true
step "$PY" -m src.bench "${shape19k[@]}" --json docs/bench_speed_gpu_19k.json
exit "$status"
