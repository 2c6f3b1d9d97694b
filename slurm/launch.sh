#!/usr/bin/env bash
# slurm/launch.sh -- the one launcher behind slurm/qwen3_*.sh: starts the EOPD trainer on every GPU
# of a SLURM allocation. Run it from an sbatch script (or inside salloc):
#
#   bash slurm/launch.sh RECIPE [key.sub=value ...]
#
# How it launches: ONE `srun` step with one task per GPU (--ntasks-per-node = GPUs per node); each
# task runs `python -m megatron_eaopd.train` directly, reading its rank from SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID and the rendezvous from MASTER_ADDR / MASTER_PORT
# (megatron_eaopd.distributed.dist_env). Why not torchrun per node: Slurm already is the process
# manager (placement, per-task signals, --kill-on-bad-exit, requeue), torchrun would add a second
# rendezvous and would die on SIGUSR1 instead of passing it to the workers; elastic restarts
# are replaced by Slurm requeue + resume from the latest checkpoint.
#
# Rendezvous: MASTER_ADDR = first host of SLURM_JOB_NODELIST (`scontrol show hostnames`), the
# host of rank 0; MASTER_PORT = 12000 + 4 * (job id % 5000) + restart count % 4 (no clash between
# jobs sharing a node, nor between a requeued job and its predecessor's TIME_WAIT sockets).
#
# Signals: the sbatch files use `--signal=B:USR1@300`, i.e. the BATCH SHELL (this script) gets
# USR1 300 s before the time limit. It forwards the signal to the srun step, which passes it to
# every task; the trainer saves a checkpoint, prints "preempted: checkpoint saved" and exits 0.
# The launcher then requeues the job (`scontrol requeue`, needs --requeue) and the next run resumes
# from <run dir>/checkpoints/latest. SIGTERM (scancel, scheduler preemption, time limit) is
# not forwarded (Slurm sends it to every task itself) and not followed by a self-requeue
# (scheduler preemption and `scontrol requeue` requeue by themselves).
# A run that ends unfinished prints the exact sbatch command that continues it.
#
# Environment knobs (all optional):
#   RECIPE        run this recipe instead of the sbatch file's (same resources), e.g. the OPD variant
#   RUN_BASE      base of per-job run directories                    [runs]
#   RUN_DIR       run directory (reuse one to continue a run)        [$RUN_BASE/<recipe>-<job id>]
#   EXTRA_ARGS    extra trainer overrides, word-split ("train.iterations=10 loss.tau=0.5");
#                 trailing arguments of the sbatch script are passed too (after EXTRA_ARGS)
#   CONTAINER     container image: run every task with pyxis (--container-image/--container-mounts)
#   CONTAINER_MOUNTS  extra pyxis mounts "src:dst[,src:dst]" (the repository is always mounted)
#   PYTHON        interpreter [python in a container, else .venv/bin/python if present, else python3]
#   TRAIN_MODULE  python module to run                               [megatron_eaopd.train]
#   ALLOW_CPU     1 = a CPU run (gloo; tests): no GPUs needed, any Slurm-granted GPUs ignored [0]
#   CHECK_PATHS   0 = skip the existence check of the checkpoints / data files [1]
#   REQUEUE_ON_SIGNAL 0 = after a USR1 checkpoint, exit instead of requeueing [1]
#   MAX_REQUEUES  stop self-requeueing after this many restarts       [20]
#   SRUN_ARGS     extra srun options, word-split (e.g. "--label")
#   DRY_RUN       1 = print the settings and the srun command, launch nothing
#   MASTER_ADDR / MASTER_PORT / OMP_NUM_THREADS / NCCL_* / TORCH_NCCL_*: respected when set
#   EAOPD_ROOT    repository root [$SLURM_SUBMIT_DIR]
set -euo pipefail

ROOT=${EAOPD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$ROOT/slurm/_env.sh" ]; then
  echo "error: $ROOT is not the megatron_eaopd repository (no slurm/_env.sh): run sbatch from the repository root or set EAOPD_ROOT" >&2
  exit 1
fi
cd "$ROOT"
# shellcheck source=slurm/_env.sh
source "$ROOT/slurm/_env.sh"

[ $# -ge 1 ] || eaopd_die "usage: bash slurm/launch.sh RECIPE [key.sub=value ...]"
RECIPE=${RECIPE:-$1}   # env RECIPE: another recipe with this sbatch file's resources (tests, variants)
shift
[ -f "$RECIPE" ] || eaopd_die "recipe '$RECIPE' not found under $ROOT"
[ -n "${SLURM_JOB_ID:-}" ] || eaopd_die "not running under SLURM (no SLURM_JOB_ID): submit with 'sbatch slurm/$(basename "$RECIPE" .yaml).sh' or run inside 'salloc'"
command -v srun >/dev/null || eaopd_die "srun not found on PATH"

eaopd_rendezvous || eaopd_die "cannot derive the rendezvous from SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
GPUS_PER_NODE=$(eaopd_gpus_per_node)
eaopd_dist_env
eaopd_container_args "$ROOT"

NAME=$(basename "$RECIPE" .yaml)
JOB_KEY=$SLURM_JOB_ID
[ -n "${SLURM_ARRAY_JOB_ID:-}" ] && JOB_KEY=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
RUN_DIR=${RUN_DIR:-${RUN_BASE:-runs}/${NAME}-${JOB_KEY}}
case $RUN_DIR in /*) ;; *) RUN_DIR=$ROOT/$RUN_DIR ;; esac
if [ -n "${CONTAINER:-}" ]; then PYTHON=${PYTHON:-python}
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
else PYTHON=${PYTHON:-python3}; fi
TRAIN_MODULE=${TRAIN_MODULE:-megatron_eaopd.train}
RESTART=${SLURM_RESTART_COUNT:-0}

# shellcheck disable=SC2206  # EXTRA_ARGS is word-split on purpose (overrides contain no spaces)
OVERRIDES=("logging.run_dir=$RUN_DIR" ${EXTRA_ARGS:-} "$@")

echo "================ megatron_eaopd SLURM launch ================"
echo "job            $SLURM_JOB_ID (${SLURM_JOB_NAME:-?}), restart $RESTART, submitted from ${SLURM_SUBMIT_DIR:-?}"
echo "recipe         $RECIPE"
echo "nodes          $NNODES: $(eaopd_expand_hostlist "$SLURM_JOB_NODELIST" | paste -sd' ')"
echo "tasks/node     $NTASKS_PER_NODE   world size $WORLD_SIZE_SLURM   GPUs/node $GPUS_PER_NODE"
echo "rendezvous     $MASTER_ADDR:$MASTER_PORT (head node = first of $SLURM_JOB_NODELIST)"
echo "run dir        $RUN_DIR"
echo "python         $PYTHON -m $TRAIN_MODULE"
echo "container      ${CONTAINER:-none}${CONTAINER:+ (mounts: ${EAOPD_CONTAINER_ARGS[1]#--container-mounts=})}"
echo "overrides      ${OVERRIDES[*]}"
echo "threads        OMP_NUM_THREADS=$OMP_NUM_THREADS  TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING  NCCL_IB_TIMEOUT=$NCCL_IB_TIMEOUT  NCCL_DEBUG=$NCCL_DEBUG"

# ------------------------------------------------------------------ validate the recipe vs allocation
[ "$WORLD_SIZE_SLURM" -ge 1 ] || eaopd_die "no tasks in the allocation (SLURM_NTASKS=${SLURM_NTASKS:-unset})"
CHECK=("$ROOT/slurm/_recipe.py" "$RECIPE" --world "$WORLD_SIZE_SLURM" --nodes "$NNODES"
  --tasks-per-node "$NTASKS_PER_NODE" --gpus-per-node "$GPUS_PER_NODE")
[ "${ALLOW_CPU:-0}" = 1 ] && CHECK+=(--allow-cpu)
[ "${CHECK_PATHS:-1}" = 1 ] && CHECK+=(--check-paths)
if [ -n "${CONTAINER:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  # the host may lack the project's Python packages: check inside the image, on one task
  settings=$(srun --nodes=1 --ntasks=1 "${EAOPD_CONTAINER_ARGS[@]}" "$PYTHON" "${CHECK[@]}" "${OVERRIDES[@]}") \
    || eaopd_die "the recipe does not fit this allocation (see above)"
else
  settings=$("$PYTHON" "${CHECK[@]}" "${OVERRIDES[@]}") || eaopd_die "the recipe does not fit this allocation (see above)"
fi
eval "$settings"
echo "layout         student TP=$RECIPE_TP PP=$RECIPE_PP DP=$RECIPE_DP; teacher TP=$RECIPE_TEACHER_TP PP=$RECIPE_TEACHER_PP"
echo "models         student $RECIPE_STUDENT   teacher $RECIPE_TEACHER"
echo "checkpoints    $RECIPE_CKPT_DIR (resume from 'latest' when present)"
echo "=============================================================="

# shellcheck disable=SC2206
SRUN=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node="$NTASKS_PER_NODE" --ntasks="$WORLD_SIZE_SLURM"
  "${EAOPD_CONTAINER_ARGS[@]}" ${SRUN_ARGS:-}
  bash "$ROOT/slurm/_task.sh" "$PYTHON" -m "$TRAIN_MODULE" --config "$RECIPE" "${OVERRIDES[@]}")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf 'dry run:'; printf ' %q' "${SRUN[@]}"; echo
  exit 0
fi
mkdir -p "$RUN_DIR"

# the command that continues this run in a new job (same run dir -> resume from latest)
continue_cmd() {
  local script=${EAOPD_SBATCH_SCRIPT:-slurm/launch.sh} envs=() v
  envs+=("RUN_DIR=$RUN_DIR")
  for v in ALLOW_CPU EXTRA_ARGS CONTAINER CONTAINER_MOUNTS PYTHON TRAIN_MODULE; do
    [ -n "${!v:-}" ] && envs+=("$v=${!v}")
  done
  printf 'cd %q &&' "$ROOT"
  printf ' %q' "${envs[@]}"
  printf ' sbatch --nodes=%s --ntasks-per-node=%s %q' "$NNODES" "$NTASKS_PER_NODE" "$script"
  [ $# -eq 0 ] || printf ' %q' "$@"
  echo
}

SIGNALED=""
REQUEUING=0
SRUN_PID=""
# USR1 (--signal=B:USR1@N, or `scancel --signal=USR1 --batch`) reaches only this shell: pass it on
# to srun, which delivers it to every task. SIGTERM is NOT forwarded: on scancel, time limit,
# preemption and `scontrol requeue` Slurm already sends it to every task itself, and a second
# SIGTERM makes srun force-kill the step while the trainer is still writing its checkpoint.
# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
  [ "$REQUEUING" = 1 ] && return 0   # our own 'scontrol requeue' sends TERM to this shell: expected
  SIGNALED=${SIGNALED:-$1}
  if [ "$1" = USR1 ]; then
    echo "[launch] $(date +%T) got SIGUSR1: forwarding to the training step (checkpoint, then exit)"
    if [ -n "$SRUN_PID" ]; then kill -s USR1 "$SRUN_PID" 2>/dev/null || true; fi
  else
    echo "[launch] $(date +%T) got SIG$1: Slurm signals the tasks itself; waiting for their checkpoint"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

"${SRUN[@]}" &
SRUN_PID=$!
rc=0
while :; do
  wait "$SRUN_PID" && rc=0 || rc=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break   # a trap interrupted 'wait': keep waiting for srun
done
echo "[launch] $(date +%T) training step ended with exit code $rc"

if [ "$rc" -eq 0 ] && [ -z "$SIGNALED" ]; then
  echo "[launch] done: $RUN_DIR"
  exit 0
fi
if [ "$rc" -eq 0 ] && [ "$SIGNALED" = USR1 ] && [ "${REQUEUE_ON_SIGNAL:-1}" = 1 ]; then
  if [ "$RESTART" -ge "${MAX_REQUEUES:-20}" ]; then
    echo "[launch] not requeueing: restart $RESTART reached MAX_REQUEUES=${MAX_REQUEUES:-20}"
  else
    REQUEUING=1
    if scontrol requeue "$SLURM_JOB_ID"; then
      echo "[launch] checkpoint saved; job $SLURM_JOB_ID requeued (restart $((RESTART + 1))), it resumes from $RECIPE_CKPT_DIR/latest"
      exit 0
    fi
    REQUEUING=0
    echo "[launch] 'scontrol requeue $SLURM_JOB_ID' failed (submitted without --requeue?)"
  fi
fi
STATE=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*\|Reason=[^ ]*' | paste -sd' ' || true)
if [ "$SIGNALED" = TERM ]; then
  echo "[launch] Slurm stopped the job ($STATE): if it was preempted or requeued (--requeue) it restarts by itself and resumes"
fi
if [ "$rc" -eq 0 ]; then
  echo "[launch] stopped after SIG$SIGNALED with a checkpoint in $RUN_DIR/checkpoints"
else
  echo "[launch] the training step FAILED (exit code $rc); the last checkpoint (if any) is in $RUN_DIR/checkpoints"
fi
echo "[launch] to continue this run from its latest checkpoint:"
echo "  $(continue_cmd "$@")"
exit "$rc"
