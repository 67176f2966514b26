#!/usr/bin/env bash
#SBATCH --job-name=kiln-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
# Stage 1 of the curriculum (conf/experiment/stage1.yaml) on a SLURM allocation, checkpointed and requeued before
# the time limit until it reaches its last step. From the repository root (logs/ must exist before sbatch):
#   mkdir -p logs && sbatch [--nodes=4 --time=...] slurm/stage1.sh vae.path=... text.t5_path=... text.clip_path=...
# Arguments are Hydra overrides. Environment: EXPERIMENT (stage1), RUN_DIR (outputs/$EXPERIMENT, never derived
# from the job id so that a requeued job resumes), and those listed in slurm/common.sh. See docs/cluster.md.
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find the checkout in KILN_ROOT, next to this file, or
# in the directory sbatch was called from.
for KILN_ROOT in "${KILN_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [ -f "$KILN_ROOT/slurm/common.sh" ] && break
done
cd "$KILN_ROOT"
# shellcheck source=slurm/common.sh
source slurm/common.sh

EXPERIMENT=${EXPERIMENT:-stage1}
RUN_DIR=${RUN_DIR:-outputs/$EXPERIMENT}
kiln_job src.train "$RUN_DIR/STOP" +experiment="$EXPERIMENT" hydra.run.dir="$RUN_DIR" "$@"
