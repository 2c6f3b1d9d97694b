#!/bin/bash
# Convert Hugging Face checkpoints to Megatron (torch_dist) for the EOPD recipes, teacher and
# student in one job (tools/convert_hf.py import; one process each, the result reshards to any
# TP/PP on load). Submit from the repository root:
#
#   sbatch slurm/convert.sh                                   # Qwen3-8B + Qwen3-4B-Base (recipes/qwen3_4b.yaml paths)
#   sbatch slurm/convert.sh HF_DIR:OUT_DIR [HF_DIR:OUT_DIR ...]   # any pairs
#
# HF_DIR is a local folder (config.json + safetensors), e.g. from
#   hf download Qwen/Qwen3-8B --local-dir checkpoints/hf/Qwen3-8B
# Env: DTYPE (bf16), VERIFY=1 (compare logits after converting), FORCE=1 (overwrite an existing
# OUT_DIR; default: skip it), CONTAINER / CONTAINER_MOUNTS / PYTHON as for slurm/launch.sh.
# Memory: the converter peaks at ~1.3x the weights above the Python baseline (~25 GB for Qwen3-8B).
#SBATCH --job-name=eopd-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=96G
#SBATCH --time=02:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err
set -euo pipefail
ROOT=${EAOPD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
# shellcheck source=slurm/_env.sh
source "$ROOT/slurm/_env.sh"
[ -n "${SLURM_JOB_ID:-}" ] || eaopd_die "not running under SLURM: submit with 'sbatch slurm/convert.sh'"
eaopd_container_args "$ROOT"
if [ -n "${CONTAINER:-}" ]; then PYTHON=${PYTHON:-python}
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
else PYTHON=${PYTHON:-python3}; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}} PYTHONUNBUFFERED=1
unset RANK LOCAL_RANK WORLD_SIZE

PAIRS=("$@")
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(checkpoints/hf/Qwen3-8B:checkpoints/mcore/Qwen3-8B
  checkpoints/hf/Qwen3-4B-Base:checkpoints/mcore/Qwen3-4B-Base)
for pair in "${PAIRS[@]}"; do   # check everything before converting anything
  [[ $pair == *:* ]] || eaopd_die "argument '$pair' is not HF_DIR:OUT_DIR"
  hf=${pair%%:*}
  [ -f "$hf/config.json" ] || eaopd_die "$hf/config.json not found: download the model first, e.g. hf download Qwen/$(basename "$hf") --local-dir $hf"
done
echo "convert job $SLURM_JOB_ID on ${SLURMD_NODENAME:-?}: ${PAIRS[*]} (dtype ${DTYPE:-bf16}, python $PYTHON, container ${CONTAINER:-none})"

i=0
for pair in "${PAIRS[@]}"; do
  hf=${pair%%:*}
  out=${pair#*:}
  i=$((i + 1))
  if [ -d "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "[convert] $out exists: skipped (FORCE=1 overwrites)"
    continue
  fi
  args=(tools/convert_hf.py import --hf "$hf" --out "$out" --dtype "${DTYPE:-bf16}" --no-progress)
  [ "${VERIFY:-0}" = 1 ] && args+=(--verify)
  echo "[convert] $(date +%T) $hf -> $out"
  # a world of one per step; own port so sequential steps never meet a TIME_WAIT socket
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$(eaopd_master_port "$SLURM_JOB_ID" "$i") \
    srun --nodes=1 --ntasks=1 "${EAOPD_CONTAINER_ARGS[@]}" "$PYTHON" "${args[@]}"
done
echo "[convert] $(date +%T) done; train with: sbatch slurm/qwen3_4b.sh"
