#!/bin/bash
# EOPD: Qwen3-32B teacher -> Qwen3-1.7B-Base student (recipes/qwen3_1.7b_32b.yaml), 2 nodes of 8 x 80 GB GPUs:
# student TP=1 x DP=16, teacher in its own layout TP=4 x DP=4 on the same 16 GPUs. Memory arithmetic: the
# recipe's header (~59 GB per GPU in topk mode). Submit from the repository root:
#
#   sbatch slurm/qwen3_1.7b_32b.sh [key.sub=value ...]          # trailing arguments = trainer overrides
#   RUN_DIR=runs/qwen3_1.7b_32b-123 sbatch slurm/qwen3_1.7b_32b.sh # continue an earlier run
#
# Everything else (rendezvous, one task per GPU, signals, requeue, run dir, checks) is in
# slurm/launch.sh; its header lists the environment knobs (RUN_BASE, EXTRA_ARGS, CONTAINER, ...).
# USR1 reaches the batch shell 300 s before the time limit: the launcher forwards it to the
# trainer (checkpoint, exit 0) and requeues the job, which resumes from the checkpoint.
#SBATCH --job-name=eopd-qwen3-1.7b-32b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
export EAOPD_SBATCH_SCRIPT=slurm/qwen3_1.7b_32b.sh
exec bash "${EAOPD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" recipes/qwen3_1.7b_32b.yaml "$@"
