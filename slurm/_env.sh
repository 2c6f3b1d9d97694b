# shellcheck shell=bash
# slurm/_env.sh -- helpers shared by slurm/launch.sh, convert.sh and evaluate.sh. Source it; it
# defines functions only (no side effects), so tests/test_slurm.py can call each one alone:
#
#   eaopd_expand_hostlist LIST     node[01-03],gpu7 -> one host per line (scontrol when it works,
#                                  else a pure-bash parser: EAOPD_HOSTLIST_NO_SCONTROL=1 forces it)
#   eaopd_head_node LIST           first host of LIST (the rendezvous host: rank 0 runs there)
#   eaopd_master_port JOBID [RESTART]   a TCP port derived from the job id (12000-31999)
#   eaopd_rendezvous               exports MASTER_ADDR/MASTER_PORT/WORLD_SIZE_SLURM/NNODES/NTASKS_PER_NODE
#   eaopd_gpus_per_node            GPUs visible to the batch step on this node (0 on CPU)
#   eaopd_dist_env                 NCCL/torch/threading defaults (never overrides a set variable)
#   eaopd_container_args ROOT      pyxis options for srun when CONTAINER is set (array EAOPD_CONTAINER_ARGS)
#   eaopd_pin_checkpoint MODEL     a checkpoint root -> the iter_* folder it names now (else MODEL unchanged)
#   eaopd_eval_out MODEL           evaluate.sh's default output folder for a (pinned) model
#   eaopd_die MSG                  print "error: MSG" to stderr and exit 1
#
# Node identity: emulated nodes (slurmd -N) all report the same `hostname`, and on real
# clusters `hostname` may differ from the Slurm node name; everything here uses the Slurm node
# list (SLURM_JOB_NODELIST) and SLURMD_NODENAME only.

eaopd_die() {
  echo "error: $*" >&2
  exit 1
}

# Expand one bracket group at a time: "a[1-2]b[3,5]" -> a1b[3,5], a2b[3,5] -> ... (recursive).
_eaopd_expand_one() {
  local item=$1 pre body post part lo hi width i
  if [[ $item != *\[* ]]; then
    printf '%s\n' "$item"
    return 0
  fi
  pre=${item%%\[*}
  body=${item#*\[}
  post=${body#*\]}
  body=${body%%\]*}
  [[ $body =~ ^[0-9,-]+$ ]] || { echo "error: cannot parse host list item '$item'" >&2; return 1; }
  local IFS=,
  for part in $body; do
    if [[ $part == *-* ]]; then
      lo=${part%-*}
      hi=${part#*-}
      width=${#lo}
      for ((i = 10#$lo; i <= 10#$hi; i++)); do
        _eaopd_expand_one "$(printf '%s%0*d%s' "$pre" "$width" "$i" "$post")" || return 1
      done
    else
      _eaopd_expand_one "$pre$part$post" || return 1
    fi
  done
}

eaopd_expand_hostlist() {
  local list=${1:-} out item depth=0 c i
  [ -n "$list" ] || { echo "error: empty host list" >&2; return 1; }
  if [ "${EAOPD_HOSTLIST_NO_SCONTROL:-0}" != 1 ] && command -v scontrol >/dev/null 2>&1 \
    && out=$(scontrol show hostnames "$list" 2>/dev/null) && [ -n "$out" ]; then
    printf '%s\n' "$out"
    return 0
  fi
  # split on commas outside brackets
  item=""
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case $c in
      \[) depth=$((depth + 1)); item+=$c ;;
      \]) depth=$((depth - 1)); item+=$c ;;
      ,) if [ "$depth" -eq 0 ]; then
           _eaopd_expand_one "$item" || return 1
           item=""
         else
           item+=$c
         fi ;;
      *) item+=$c ;;
    esac
  done
  [ -z "$item" ] || _eaopd_expand_one "$item"
}

eaopd_head_node() {
  local hosts
  hosts=$(eaopd_expand_hostlist "$1") || return 1
  printf '%s\n' "${hosts%%$'\n'*}"
}

# 12000..31999: below the Linux ephemeral range (32768+), so a client socket never holds it.
# The restart count shifts it so a requeued job never races the TIME_WAIT of its predecessor.
eaopd_master_port() {
  local job=${1:?job id} restart=${2:-0}
  echo $((12000 + (job % 5000) * 4 + restart % 4))
}

# Needs SLURM_JOB_ID and SLURM_JOB_NODELIST. Respects a MASTER_ADDR/MASTER_PORT set by the user.
eaopd_rendezvous() {
  [ -n "${SLURM_JOB_ID:-}" ] || { echo "error: SLURM_JOB_ID is not set" >&2; return 1; }
  [ -n "${SLURM_JOB_NODELIST:-}" ] || { echo "error: SLURM_JOB_NODELIST is not set" >&2; return 1; }
  local head
  head=$(eaopd_head_node "$SLURM_JOB_NODELIST") || return 1
  MASTER_ADDR=${MASTER_ADDR:-$head}
  MASTER_PORT=${MASTER_PORT:-$(eaopd_master_port "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}")}
  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$(eaopd_expand_hostlist "$SLURM_JOB_NODELIST" | wc -l)}}
  # SLURM_NTASKS_PER_NODE is only set with --ntasks-per-node; SLURM_TASKS_PER_NODE is e.g. "2(x3)"
  NTASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}
  NTASKS_PER_NODE=${NTASKS_PER_NODE%%,*}
  WORLD_SIZE_SLURM=${SLURM_NTASKS:-$((NNODES * NTASKS_PER_NODE))}
  export MASTER_ADDR MASTER_PORT NNODES NTASKS_PER_NODE WORLD_SIZE_SLURM
}

# GPUs this node gives the job: the gres count Slurm granted, else CUDA_VISIBLE_DEVICES, else nvidia-smi.
eaopd_gpus_per_node() {
  local n=""
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    n=$SLURM_GPUS_ON_NODE
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]; then
    n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  fi
  echo "${n:-0}"
}

# Distributed/threading defaults. Every variable keeps a value the user exported.
eaopd_dist_env() {
  local cpus=${SLURM_CPUS_PER_TASK:-}
  if [ -z "$cpus" ] && [ -n "${SLURM_CPUS_ON_NODE:-}" ] && [ -n "${NTASKS_PER_NODE:-}" ] && [ "$NTASKS_PER_NODE" -gt 0 ]; then
    cpus=$((SLURM_CPUS_ON_NODE / NTASKS_PER_NODE))
  fi
  [ -n "$cpus" ] && [ "$cpus" -ge 1 ] || cpus=1
  # a dataloader-free trainer: a few intra-op threads per rank; more only fights NCCL's proxy threads
  [ "$cpus" -gt 8 ] && cpus=8
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  export PYTHONUNBUFFERED=1
  # Megatron: TP/SP communication overlap needs one hardware queue (ordering of kernels)
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # a failed/hung collective aborts the process (then srun --kill-on-bad-exit ends the step)
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-1200}
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-0}
  # InfiniBand: retry longer before declaring a link dead (NCCL default 18 is tight on busy fabrics)
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # do not let a user's torchrun variables shadow the per-task SLURM_* ranks (distributed.dist_env)
  unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK
}

# pyxis/enroot: run every task in the image with the repository mounted at the same path.
# Sets the array EAOPD_CONTAINER_ARGS (empty without CONTAINER).
eaopd_container_args() {
  local root=${1:?repo root} mounts
  # shellcheck disable=SC2034  # read by the scripts that source this file
  EAOPD_CONTAINER_ARGS=()
  [ -n "${CONTAINER:-}" ] || return 0
  mounts="$root:$root"
  [ -n "${CONTAINER_MOUNTS:-}" ] && mounts="$mounts,$CONTAINER_MOUNTS"
  # shellcheck disable=SC2034
  EAOPD_CONTAINER_ARGS=(--container-image="$CONTAINER" --container-mounts="$mounts"
    --container-workdir="$root" --no-container-mount-home)
}

# A checkpoint root (with 'latest', or iter_* folders) -> the iter_* folder it means NOW ('latest',
# else the newest complete iter_*); anything else is printed unchanged. slurm/evaluate.sh evaluates
# the pinned folder, so the weights and the output folder agree while training keeps saving.
eaopd_pin_checkpoint() {
  local m=${1%/} name iters
  if [ -f "$m/eaopd_checkpoint.json" ]; then
    printf '%s\n' "$m"
  elif [ -f "$m/latest" ]; then
    name=$(tr -d '[:space:]' <"$m/latest")
    printf '%s\n' "$m/$name"
  elif compgen -G "$m/iter_*/eaopd_checkpoint.json" >/dev/null; then
    iters=("$m"/iter_*/eaopd_checkpoint.json)
    dirname "${iters[-1]}"
  else
    printf '%s\n' "$m"
  fi
}

# Default evaluation output folder for a (pinned) model:
#   <run>/checkpoints/iter_N -> <run>/eval/iter_N
#   <dir>/<ckpt>/iter_N      -> <dir>/eval/<ckpt>-iter_N   (a converted checkpoint, e.g. checkpoints/mcore/Qwen3-4B-Base)
#   <run>/<hf folder>        -> <run>/eval/<hf folder>      (a run's export, e.g. runs/qwen3_4b-123/hf_student)
#   <dir>/<hf folder>        -> <dir>/../eval/<hf folder>
eaopd_eval_out() {
  local m=${1%/} root
  case "$(basename "$m")" in
    iter_*)
      root=$(dirname "$m")
      if [ "$(basename "$root")" = checkpoints ]; then
        printf '%s\n' "$(dirname "$root")/eval/$(basename "$m")"
      else
        printf '%s\n' "$(dirname "$root")/eval/$(basename "$root")-$(basename "$m")"
      fi
      ;;
    *)
      if [ -d "$(dirname "$m")/checkpoints" ]; then  # inside a run directory: the run's own eval folder
        printf '%s\n' "$(dirname "$m")/eval/$(basename "$m")"
      else
        printf '%s\n' "$(dirname "$(dirname "$m")")/eval/$(basename "$m")"
      fi
      ;;
  esac
}
