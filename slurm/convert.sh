#!/bin/bash
# Convert Hugging Face checkpoints to Megatron (torch_dist) for the EOPD recipes, teacher and
# student in one job (tools/convert_hf.py import; one process each, the result reshards to any
# TP/PP on load). Submit from the repository root:
#
#   sbatch slurm/convert.sh                                   # Qwen3-8B + Qwen3-4B-Base (recipes/qwen3_4b.yaml paths)
#   sbatch slurm/convert.sh HF:OUT_DIR [HF:OUT_DIR ...]       # any pairs
#
# HF is what tools/convert_hf.py import --hf takes: a local folder (config.json + safetensors), or a hub
# id (ORG/NAME) already in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
# ~/.cache/huggingface/hub; never downloaded: run `hf download ORG/NAME` on a machine with network,
# with the same HF_HOME / HF_HUB_CACHE). The defaults are checkpoints/hf/Qwen3-8B and
# checkpoints/hf/Qwen3-4B-Base when those folders exist (hf download ... --local-dir), else the hub ids
# Qwen/Qwen3-8B and Qwen/Qwen3-4B-Base from the cache; written to checkpoints/mcore/<name>.
# An OUT_DIR that already holds a complete checkpoint ('latest' naming an iter_* folder with
# eaopd_checkpoint.json) is skipped; anything else there (e.g. a crashed conversion's .iter_*.tmp) is
# converted again. Every pair is checked by the converter (--check-only) before any is converted: an OUT_DIR
# holding other data, a file, or one OUT_DIR given twice stops the job before it converts anything.
# Env: DTYPE (bf16), VERIFY=1 (compare logits after converting), FORCE=1 (convert again even over a
# complete checkpoint), CONTAINER / CONTAINER_MOUNTS / PYTHON as for slurm/launch.sh (the HF cache
# must be mounted in the container too).
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

# the hub cache folder, in huggingface_hub's order (as megatron_eaopd.models.sources.hub_cache_dir)
hub_cache() {
  if [ -n "${HF_HUB_CACHE:-}" ]; then echo "$HF_HUB_CACHE"
  elif [ -n "${HUGGINGFACE_HUB_CACHE:-}" ]; then echo "$HUGGINGFACE_HUB_CACHE"
  elif [ -n "${HF_HOME:-}" ]; then echo "$HF_HOME/hub"
  else echo "${XDG_CACHE_HOME:-$HOME/.cache}/huggingface/hub"; fi
}

# a hub id's cached snapshot (refs/main) holds config.json: the converter finds it there
hub_cached() {
  local repo ref
  repo="$(hub_cache)/models--${1//\//--}"
  [ -f "$repo/refs/main" ] || return 1
  ref=$(tr -d '[:space:]' <"$repo/refs/main")
  [ -n "$ref" ] && [ -f "$repo/snapshots/$ref/config.json" ]
}

# complete: 'latest' names an iter_* folder holding eaopd_checkpoint.json (megatron_eaopd/checkpoint.py
# renames a save into place only when it is complete, and writes 'latest' last)
complete_checkpoint() {
  local name
  [ -f "$1/latest" ] || return 1
  name=$(tr -d '[:space:]' <"$1/latest")
  [[ $name == iter_* ]] && [ -f "$1/$name/eaopd_checkpoint.json" ]
}

PAIRS=("$@")
if [ ${#PAIRS[@]} -eq 0 ]; then
  for name in Qwen3-8B Qwen3-4B-Base; do
    if [ -d "checkpoints/hf/$name" ]; then src=checkpoints/hf/$name; else src=Qwen/$name; fi
    PAIRS+=("$src:checkpoints/mcore/$name")
  done
fi
HUB_ID='^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$'
for pair in "${PAIRS[@]}"; do   # check everything before converting anything
  [[ $pair == *:* ]] || eaopd_die "argument '$pair' is not HF:OUT_DIR"
  hf=${pair%%:*}
  out=${pair#*:}
  if [ -z "$hf" ] || [ -z "$out" ]; then eaopd_die "argument '$pair' is not HF:OUT_DIR"; fi
  if [ -e "$hf" ]; then
    [ -f "$hf/config.json" ] || eaopd_die "$hf/config.json not found: $hf is not a Hugging Face model folder"
  elif [[ $hf =~ $HUB_ID ]]; then
    hub_cached "$hf" || eaopd_die "$hf is neither a local folder (in $ROOT) nor in the Hugging Face cache $(hub_cache): on a machine with network, with the same HF_HOME / HF_HUB_CACHE, run: hf download $hf (or hf download $hf --local-dir checkpoints/hf/${hf##*/} and pass that folder)"
  else
    eaopd_die "$hf does not exist (in $ROOT): give a Hugging Face folder or a cached hub id (ORG/NAME)"
  fi
done
echo "convert job $SLURM_JOB_ID on ${SLURMD_NODENAME:-?}: ${PAIRS[*]} (dtype ${DTYPE:-bf16}, python $PYTHON, container ${CONTAINER:-none})"

# the converter's own checks (source, dtype, OUT_DIR) for every pair that will be converted, before converting
# any: an OUT_DIR holding other data, a training run's checkpoints or a path under a file stops the job now,
# not after the earlier pairs have run; the same OUT_DIR twice would convert one model and skip the other
declare -A SEEN_OUT=()
for pair in "${PAIRS[@]}"; do
  hf=${pair%%:*}
  out=${pair#*:}
  key=$(realpath -m -- "$out")
  [ -z "${SEEN_OUT[$key]:-}" ] || eaopd_die "OUT_DIR $out is given twice ('${SEEN_OUT[$key]}' and '$pair'): give each model its own folder"
  SEEN_OUT[$key]=$pair
  if complete_checkpoint "$out" && [ "${FORCE:-0}" != 1 ]; then continue; fi  # skipped below
  srun --nodes=1 --ntasks=1 "${EAOPD_CONTAINER_ARGS[@]}" "$PYTHON" tools/convert_hf.py import --hf "$hf" --out "$out" \
    --dtype "${DTYPE:-bf16}" --check-only || eaopd_die "pair '$pair' cannot be converted (the converter's error is above); nothing was converted"
done

i=0
for pair in "${PAIRS[@]}"; do
  hf=${pair%%:*}
  out=${pair#*:}
  i=$((i + 1))
  if complete_checkpoint "$out"; then
    if [ "${FORCE:-0}" != 1 ]; then
      echo "[convert] $out holds a complete checkpoint ($(tr -d '[:space:]' <"$out/latest")): skipped (FORCE=1 converts again)"
      continue
    fi
  elif [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "[convert] $out exists but holds no complete checkpoint (no 'latest' naming an iter_* folder with eaopd_checkpoint.json, e.g. a crashed conversion): converting again"
  fi
  args=(tools/convert_hf.py import --hf "$hf" --out "$out" --dtype "${DTYPE:-bf16}" --no-progress)
  [ "${VERIFY:-0}" = 1 ] && args+=(--verify)
  echo "[convert] $(date +%T) $hf -> $out"
  # a world of one per step; own port so sequential steps never meet a TIME_WAIT socket
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$(eaopd_master_port "$SLURM_JOB_ID" "$i") \
    srun --nodes=1 --ntasks=1 "${EAOPD_CONTAINER_ARGS[@]}" "$PYTHON" "${args[@]}"
done
echo "[convert] $(date +%T) done; train with: sbatch slurm/qwen3_4b.sh"
