#!/usr/bin/env bash
# The CPU demo, from a fresh machine: install, generate synthetic video shards, train the `demo` experiment on
# 2 CPU ranks with ZeRO-3, plot the loss and sample videos from the final checkpoint. Outputs in outputs/.
# Environment: NPROC (ranks, default 2), STEPS (default: the experiment's), SKIP_INSTALL=1 to skip pip.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RUN_DIR=${RUN_DIR:-outputs/demo}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    bash launch/install.sh
fi

if [ ! -d outputs/synthetic ]; then
    python -m src.data.synthetic outputs/synthetic --num-clips 512 --clips-per-shard 64 --frames 24 --size 64
fi

torchrun --standalone --nproc_per_node="$NPROC" -m src.train +experiment=demo hydra.run.dir="$RUN_DIR" \
    ${STEPS:+steps=$STEPS}

python -m src.metrics "$RUN_DIR"
python -m src.sample "$RUN_DIR" --steps 30 --guidance 4 --out "$RUN_DIR/samples" \
    --prompt "a red square moving left on a dark background" \
    --prompt "a yellow circle moving up on a dark background"
echo "demo done: $RUN_DIR/loss.png, $RUN_DIR/samples/*.mp4, $RUN_DIR/metrics.jsonl"
