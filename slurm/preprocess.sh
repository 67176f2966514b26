#!/usr/bin/env bash
#SBATCH --job-name=kiln-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
# The feature cache of an experiment (src.preprocess writes its `data.urls`), on a SLURM allocation. Preprocessing
# skips the shards it has finished, so before the time limit the step is stopped with SIGTERM and the job requeued
# to carry on. From the repository root (logs/ must exist before sbatch):
#   mkdir -p logs && EXPERIMENT=stage1 sbatch slurm/preprocess.sh vae.path=... text.t5_path=... text.clip_path=...
# Arguments are Hydra overrides. Environment: EXPERIMENT (stage1), and those listed in slurm/common.sh.
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
kiln_job src.preprocess "" +experiment="$EXPERIMENT" "$@"
