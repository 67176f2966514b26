#!/usr/bin/env bash
# The CPU demo, from a fresh machine: install, generate synthetic video shards, run the two-stage demo curriculum
# (conf/curriculum/demo.yaml: `demo` at 16x16, then `demo_stage2` at 32x32 from its final checkpoint), refusing to
# start stage 2 from an unhealthy stage 1, then judge what both stages draw: colour and direction of motion read
# from the pixels of 96 sampled videos (every colour x shape x direction). Outputs in outputs/.
# Running it again resumes (finished stages are skipped).
# Environment: NPROC (default 1: one process, the local engine; N > 1: N ZeRO-3 ranks over gloo, the same global
# batch of 16 clips), SKIP_INSTALL=1 to skip pip, JUDGE_STEPS (Euler steps of the judge's samples, default 20),
# PYTHON (default: the active virtual environment, else the project's .venv, created: launch/python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
if [ "$NPROC" = 1 ]; then
    ENGINE=(parallel=local)  # on 2 CPU cores one process with both threads is faster than 2 ranks of one thread
else
    ENGINE=(parallel=zero3 "data.buckets.batch_scale=$(python3 -c "print(1 / $NPROC)")")
fi
started=$(date +%s)
# shellcheck source=launch/python.sh
source launch/python.sh
PYTHON=$(kiln_python)  # the active virtual environment, else the project's .venv (launch/python.sh)
export PYTHON

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    bash launch/install.sh
fi

if [ ! -d outputs/synthetic_demo ]; then
    "$PYTHON" -m src.data.synthetic outputs/synthetic_demo --num-clips 512 --clips-per-shard 64 --frames 24 --size 64 \
        --radius 0.12 0.2 --slack 0.05 --lane 0.3
fi

# exits 75 if a stage was stopped (SIGUSR1/SIGTERM/STOP file): run this script again to resume; 4 if stage 1 ended
# with a learning alarm (outputs/demo/stage_report.json says which)
"$PYTHON" -m src.stages conf/curriculum/demo.yaml --nproc "$NPROC" --out-dir outputs --require-healthy "${ENGINE[@]}"

for run_dir in outputs/demo outputs/demo_stage2; do
    "$PYTHON" -m src.metrics "$run_dir"
    "$PYTHON" -m src.data.judge "$run_dir" --steps "${JUDGE_STEPS:-20}"
done
"$PYTHON" -m src.sample outputs/demo_stage2 --steps 30 --guidance 4 --out outputs/demo_stage2/samples \
    --prompt "a red square moving left on a dark background" \
    --prompt "a yellow circle moving up on a dark background"
echo "demo done in $(( $(date +%s) - started )) s: outputs/demo*/{loss,learning}.png, judge.json, judge_strip.png," \
    "stage_report.json; outputs/demo_stage2/samples/*.mp4"
