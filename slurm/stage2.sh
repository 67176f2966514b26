#!/usr/bin/env bash
#SBATCH --job-name=kiln-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
# Stage 2 of the curriculum (conf/experiment/stage2.yaml), initialised from the weights of a finished stage-1 run
# (`init_from=$STAGE1_DIR`), checkpointed and requeued before the time limit like stage 1. After stage 1:
#   mkdir -p logs && sbatch --dependency=afterok:<stage-1 job id> slurm/stage2.sh vae.path=... text.t5_path=...
# Arguments are Hydra overrides. Environment: EXPERIMENT (stage2), RUN_DIR (outputs/$EXPERIMENT), STAGE1_DIR
# (outputs/stage1, the stage-1 run directory), and those listed in slurm/common.sh. See docs/cluster.md.
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find the checkout in KILN_ROOT, next to this file, or
# in the directory sbatch was called from.
for KILN_ROOT in "${KILN_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [ -f "$KILN_ROOT/slurm/common.sh" ] && break
done
cd "$KILN_ROOT"
# shellcheck source=slurm/common.sh
source slurm/common.sh

EXPERIMENT=${EXPERIMENT:-stage2}
RUN_DIR=${RUN_DIR:-outputs/$EXPERIMENT}
STAGE1_DIR=${STAGE1_DIR:-outputs/stage1}
kiln_job src.train "$RUN_DIR/STOP" +experiment="$EXPERIMENT" hydra.run.dir="$RUN_DIR" init_from="$STAGE1_DIR" "$@"
