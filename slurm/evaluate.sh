#!/bin/bash
# Evaluate a checkpoint on the paper's math benchmarks (tools/evaluate.py: Avg@8 / Pass@k with
# math-verify; resumable). One task per GPU, TP = number of tasks. Submit from the repository root:
#
#   MODEL=runs/qwen3_4b-123/checkpoints/iter_0000175 sbatch slurm/evaluate.sh [extra evaluate.py args]
#   MODEL=runs/qwen3_4b-123/checkpoints sbatch slurm/evaluate.sh   # the iteration 'latest' names when the job starts
#   MODEL=... sbatch --ntasks-per-node=2 --gpus-per-node=2 slurm/evaluate.sh    # TP=2
#
# Prompts use the format the checkpoint was trained with (chat template, suffix: recorded in its
# eaopd_checkpoint.json); an HF folder or a converted checkpoint records none: plain prompts. Override
# with extra arguments: sbatch slurm/evaluate.sh --chat-template   (or --no-chat-template)
# Env: MODEL (required: Megatron checkpoint or HF folder), DATA_DIR (data/eval: math500.jsonl ...),
# OUT (default <run>/eval/iter_N for <run>/checkpoints[/iter_N]; <dir>/../eval/<name> for an HF folder
# <dir>/<name>), TP (default: tasks in the job),
# CONTAINER / CONTAINER_MOUNTS / PYTHON as for slurm/launch.sh.
#SBATCH --job-name=eopd-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=08:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail
ROOT=${EAOPD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
# shellcheck source=slurm/_env.sh
source "$ROOT/slurm/_env.sh"
[ -n "${SLURM_JOB_ID:-}" ] || eaopd_die "not running under SLURM: submit with 'MODEL=... sbatch slurm/evaluate.sh'"
[ -n "${MODEL:-}" ] || eaopd_die "set MODEL to a checkpoint: MODEL=runs/<run>/checkpoints/iter_XXXXXXX sbatch slurm/evaluate.sh"
[ -e "$MODEL" ] || eaopd_die "MODEL=$MODEL does not exist"
# a checkpoint root is pinned to the iteration its 'latest' names when the job first starts: the job evaluates
# exactly that one into its own folder, and a requeue of the same job resumes it (the pin is kept per job id);
# a new job after training saved again evaluates the new latest into a new folder
PIN_FILE=${EAOPD_STATE_DIR:-$ROOT/slurm/logs}/.evaluate-$SLURM_JOB_ID.model
if [ -s "$PIN_FILE" ]; then
  PINNED=$(cat "$PIN_FILE")
else
  PINNED=$(eaopd_pin_checkpoint "$MODEL")
  mkdir -p "$(dirname "$PIN_FILE")"
  printf '%s\n' "$PINNED" >"$PIN_FILE"
fi
[ -e "$PINNED" ] || eaopd_die "MODEL=$MODEL points to $PINNED, which does not exist"
MODEL=$PINNED
DATA_DIR=${DATA_DIR:-data/eval}
[ -d "$DATA_DIR" ] || eaopd_die "DATA_DIR=$DATA_DIR does not exist (folder with math500.jsonl amc23.jsonl ...)"
eaopd_rendezvous || eaopd_die "cannot derive the rendezvous from SLURM_JOB_NODELIST"
eaopd_dist_env
eaopd_container_args "$ROOT"
if [ -n "${CONTAINER:-}" ]; then PYTHON=${PYTHON:-python}
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
else PYTHON=${PYTHON:-python3}; fi
TP=${TP:-$WORLD_SIZE_SLURM}
OUT=${OUT:-$(eaopd_eval_out "$MODEL")}
echo "evaluate job $SLURM_JOB_ID: model $MODEL, data $DATA_DIR, out $OUT, TP=$TP, $WORLD_SIZE_SLURM task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
# requeue/rerun resumes: tools/evaluate.py skips problems already complete in OUT
srun --kill-on-bad-exit=1 --ntasks="$WORLD_SIZE_SLURM" "${EAOPD_CONTAINER_ARGS[@]}" \
  bash "$ROOT/slurm/_task.sh" "$PYTHON" tools/evaluate.py --model "$MODEL" --data-dir "$DATA_DIR" \
  --out "$OUT" --tp "$TP" --no-progress "$@"
echo "[evaluate] done: $OUT/summary.json"
