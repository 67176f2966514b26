#!/usr/bin/env bash
# The CPU demo, from a fresh machine: install, generate synthetic video shards, run the two-stage demo curriculum
# (conf/curriculum/demo.yaml: `demo` at 32x32, then `demo_stage2` at 64x64 from its final checkpoint) on 2 CPU
# ranks with ZeRO-3, plot the losses and sample videos from the final checkpoint. Outputs in outputs/.
# Running it again resumes (finished stages are skipped).
# Environment: NPROC (ranks, default 2), SKIP_INSTALL=1 to skip pip.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    bash launch/install.sh
fi

if [ ! -d outputs/synthetic ]; then
    python -m src.data.synthetic outputs/synthetic --num-clips 512 --clips-per-shard 64 --frames 24 --size 64
fi

# exits 75 if a stage was stopped (SIGUSR1/SIGTERM/STOP file): run this script again to resume
python -m src.stages conf/curriculum/demo.yaml --nproc "$NPROC" --out-dir outputs

for run_dir in outputs/demo outputs/demo_stage2; do
    python -m src.metrics "$run_dir"
done
python -m src.sample outputs/demo_stage2 --steps 30 --guidance 4 --out outputs/demo_stage2/samples \
    --prompt "a red square moving left on a dark background" \
    --prompt "a yellow circle moving up on a dark background"
echo "demo done: outputs/demo*/loss.png, outputs/demo_stage2/samples/*.mp4, outputs/demo_stage2/transition.json"
