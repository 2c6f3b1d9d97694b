#!/usr/bin/env bash
# slurm/_task.sh -- per-task wrapper run by srun (one per GPU): print where this rank runs and
# which rendezvous it uses, then exec the trainer (exec: signals from srun reach python directly).
# Node name from SLURMD_NODENAME, never `hostname` (emulated and some real nodes disagree).
echo "[task] rank=${SLURM_PROCID:-?}/${SLURM_NTASKS:-?} local_rank=${SLURM_LOCALID:-?} node=${SLURMD_NODENAME:-?} master=${MASTER_ADDR:-?}:${MASTER_PORT:-?} cuda_visible=${CUDA_VISIBLE_DEVICES:-none} restart=${SLURM_RESTART_COUNT:-0}"
exec "$@"
