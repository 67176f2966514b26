#!/usr/bin/env bash
# One node: NPROC ranks of a Kiln entry point through torchrun's standalone rendezvous (a free local port, no
# MASTER_ADDR). Arguments are torchrun's program and its arguments, with paths relative to the repository root:
#   bash launch/torchrun.sh -m src.train +experiment=stage1 hydra.run.dir=outputs/stage1
#   NPROC=2 bash launch/torchrun.sh -m src.train +experiment=smoke hydra.run.dir=outputs/smoke   # on a CPU
# Environment: NPROC (default: one rank per GPU, 1 without nvidia-smi), KILN_DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC=${NPROC:-gpu} # torchrun counts the visible GPUs
else
    NPROC=${NPROC:-1}
fi
cmd=(torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" "$@")
if [ "${KILN_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
else
    exec "${cmd[@]}"
fi
