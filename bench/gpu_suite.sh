#!/usr/bin/env bash
# One GPU check (one H200-class GPU): install check, GPU tests, loss benchmark, training-iteration
# benchmark; results in bench/results/gpu_*.json and a summary table printed last (see bench/GPU.md).
#
#   bash bench/gpu_suite.sh             # on a GPU node
#   bash bench/gpu_suite.sh --dry-run   # on CPU, tiny sizes: checks the script end to end
#
# Options:
#   --dry-run        tiny sizes, no pip install, results in ${TMPDIR:-/tmp}/gpu_suite_dryrun unless --results
#   --results DIR    where gpu_suite.json / gpu_loss.json / gpu_train.json / gpu_suite.log go
#   --steps LIST     comma list out of env,pytest,loss,train (default: all, in that order)
# Environment: PYTHON (default python3), OUT (a folder: results are also copied there after
# every step), GPU_SUITE_BUDGET_S (total seconds, default 460), GPU_SUITE_FAIL_STEP (test hook:
# that step runs `false`).
#
# Every step has its own timeout and is recorded in gpu_suite.json as soon as it ends, so a
# result file exists even when a later step fails or the whole command is killed. No `set -e`:
# a failing step never stops the next one. Exit status: 0 if every step passed, else 1.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DRY=0
INTERNAL_ENV=0
RESULTS=""
STEPS="env,pytest,loss,train"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --internal-env-step) INTERNAL_ENV=1 ;;
        --results) RESULTS=${2:?--results needs a directory}; shift ;;
        --results=*) RESULTS=${1#--results=} ;;
        --steps) STEPS=${2:?--steps needs a list}; shift ;;
        --steps=*) STEPS=${1#--steps=} ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$RESULTS" ]; then
    if [ "$DRY" = 1 ]; then RESULTS=${TMPDIR:-/tmp}/gpu_suite_dryrun; else RESULTS=$ROOT/bench/results; fi
fi
mkdir -p "$RESULTS/logs" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)

PY=${PYTHON:-python3}
HELPER_PY=python3
command -v "$HELPER_PY" >/dev/null 2>&1 || HELPER_PY=$PY
SUMMARY=$RESULTS/gpu_suite.json
LOG=$RESULTS/gpu_suite.log
BUDGET=${GPU_SUITE_BUDGET_S:-460}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONDONTWRITEBYTECODE=1
case ":${PYTHONPATH:-}:" in *":$ROOT:"*) ;; *) export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} ;; esac
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob

# per-step time limits (seconds): 45 + 150 + 90 + 170 = 455 <= 8 minutes with the summary
declare -A LIMIT=([env]=45 [pytest]=150 [loss]=90 [train]=170)
if [ "$DRY" = 1 ]; then
    # the dry run checks the suite itself on a CPU machine, often a shared one: twice the time per step
    for k in "${!LIMIT[@]}"; do LIMIT[$k]=$(( LIMIT[$k] * 2 )); done
    BUDGET=${GPU_SUITE_BUDGET_S:-920}
fi

log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# json_update STEP STATUS RC SECONDS : record one step (and merge its result file) in gpu_suite.json
json_update() {
    "$HELPER_PY" - "$SUMMARY" "$RESULTS" "$@" <<'PY'
import json, os, sys, time
path, results = sys.argv[1], sys.argv[2]
step, status, rc, secs = sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
d = json.load(open(path))
rec = {"status": status, "rc": rc, "seconds": round(secs, 1)}
logf = os.path.join(results, "logs", step + ".log")
if os.path.exists(logf):
    lines = open(logf, errors="replace").read().splitlines()
    rec["log_tail"] = lines[-15:]
sub = {"env": "gpu_env.json", "loss": "gpu_loss.json", "train": "gpu_train.json"}.get(step)
if sub and os.path.exists(os.path.join(results, sub)):
    try:
        d["results"][step] = json.load(open(os.path.join(results, sub)))
    except ValueError as e:
        rec["result_error"] = str(e)
if step == "pytest" and os.path.exists(logf):
    import re
    tail = [l for l in open(logf, errors="replace").read().splitlines() if re.search(r"\b(passed|failed|skipped|error|no tests ran)\b", l)]
    rec["pytest_summary"] = tail[-1].strip("= ") if tail else None
    rec["failed_tests"] = [l.split(" ", 1)[1].split(" - ")[0] for l in open(logf, errors="replace").read().splitlines()
                           if l.startswith("FAILED ") or l.startswith("ERROR ")]
d["steps"][step] = rec
d["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
json.dump(d, open(path, "w"), indent=2)
PY
}

# copy the result files to $OUT after every step, so a killed run still leaves them there
publish() {
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        local f
        for f in gpu_suite.json gpu_loss.json gpu_train.json gpu_env.json gpu_suite.log; do
            [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/$f"
        done
    fi
}

# run_step NAME CMD... : run with its time limit (bounded by what is left of the budget), log, record
run_step() {
    local name=$1; shift
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=${LIMIT[$name]}
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        log "step $name: skipped, the suite's ${BUDGET}s budget is spent"
        json_update "$name" skipped_budget -1 0
        publish
        return 1
    fi
    if [ "${GPU_SUITE_FAIL_STEP:-}" = "$name" ]; then
        set -- false
    fi
    log "step $name: start (limit ${limit}s): $*"
    local t0 rc status ms secs
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" >"$RESULTS/logs/$name.log" 2>&1
    rc=$?
    cat "$RESULTS/logs/$name.log" >>"$LOG"
    tail -n 25 "$RESULTS/logs/$name.log"
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    secs="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    log "step $name: $status (rc=$rc, ${secs}s)"
    json_update "$name" "$status" "$rc" "$secs"
    publish
    [ "$rc" = 0 ]
}

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# ---- (1) installation check (run by the suite as a child: bash gpu_suite.sh --internal-env-step) -----
step_env() {
    local missing=0 w name have
    have=$(printf '%s\n' "${WHEELS[@]##*/}" | tr '[:upper:]-' '[:lower:]_')
    # wheels listed in bench/wheels.txt that .whl/ lacks (informational; the import check below decides)
    while read -r w; do
        case "$w" in ''|'#'*) continue ;; esac
        name=$(echo "${w%%==*}" | tr '[:upper:]-' '[:lower:]_')
        if ! grep -q "^${name}-${w##*==}-" <<<"$have"; then
            echo "wheels: .whl/ lacks $w"; missing=$((missing + 1))
        fi
    done <bench/wheels.txt
    echo "wheels: $missing of the wheels in bench/wheels.txt missing from .whl/"
    if [ "$DRY" = 1 ]; then
        echo "dry-run: pip install from .whl/ skipped"
    elif [ "${#WHEELS[@]}" -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS[@]}" \
            || { echo "pip install from .whl/ failed"; return 1; }
        echo "installed ${#WHEELS[@]} wheels into /tmp/site"
    else
        echo "no .whl/ folder: using the installed packages"
    fi
    "$PY" - "$RESULTS/gpu_env.json" <<'PY'
import importlib, json, subprocess, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
def ver(mod, attr="__version__"):
    try:
        m = importlib.import_module(mod)
        return str(getattr(m, attr, "present"))
    except Exception as e:  # noqa: BLE001
        return None if isinstance(e, ModuleNotFoundError) else f"import error: {type(e).__name__}: {str(e)[:200]}"
import torch
out.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
           device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           device_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None)
for name, mod in [("megatron_core", "megatron.core"), ("transformer_engine", "transformer_engine"), ("flash_attn", "flash_attn"),
                  ("apex", "apex"), ("transformers", "transformers"), ("pydantic", "pydantic"), ("triton", "triton"),
                  ("math_verify", "math_verify")]:
    out[name] = ver(mod)
try:
    from megatron_eaopd.models.provider import te_available
    out["te_available"] = te_available()
except Exception as e:  # noqa: BLE001
    out["te_available"] = f"error: {e}"
try:
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
except Exception:
    out["nvidia_smi"] = None
json.dump(out, open(sys.argv[1], "w"), indent=2)
for k, v in out.items():
    print(f"{k:20s} {v}")
ok = out["megatron_core"] and not str(out["megatron_core"]).startswith("import error") and out["pydantic"]
sys.exit(0 if ok else 3)
PY
}

if [ "$INTERNAL_ENV" = 1 ]; then
    step_env
    exit $?
fi
: >"$LOG"

# ---- skeleton result file, written before anything can fail ---------------------------------------
"$HELPER_PY" - "$SUMMARY" "$DRY" "$STEPS" "$BUDGET" <<'PY'
import json, socket, subprocess, sys, time
path, dry, steps, budget = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split(","), int(sys.argv[4])
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
except Exception:
    commit = None
json.dump({
    "suite": "gpu_suite", "dry_run": dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "host": socket.gethostname(), "commit": commit, "budget_s": budget,
    "targets": {"train_mfu": ">= 0.40", "loss_topk_time_vs_megatron_ce": "<= 1.3", "loss_full_time_vs_megatron_ce": "<= 2.2"},
    "steps": {s: {"status": "pending"} for s in steps}, "results": {}, "summary": None,
}, open(path, "w"), indent=2)
PY
[ -f "$SUMMARY" ] || { echo "gpu_suite.sh: cannot write $SUMMARY" >&2; exit 2; }
publish
log "results in $RESULTS (dry_run=$DRY, steps=$STEPS, budget ${BUDGET}s, python=$PY)"

if want env; then
    # step_env installs into /tmp/site in a child shell; this shell puts /tmp/site first on PYTHONPATH
    if [ "$DRY" = 0 ] && [ "${#WHEELS[@]}" -gt 0 ]; then
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    env_args=(--internal-env-step --results "$RESULTS")
    [ "$DRY" = 1 ] && env_args+=(--dry-run)
    run_step env bash "$ROOT/bench/gpu_suite.sh" "${env_args[@]}"
fi

# ---- (2) GPU tests -----------------------------------------------------------------------------------
if want pytest; then
    run_step pytest "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_gpu.py tests/test_rollout.py
fi

# ---- (3) loss benchmark ---------------------------------------------------------------------------------
if want loss; then
    if [ "$DRY" = 1 ]; then
        run_step loss "$PY" bench/bench_loss.py --tokens 64 --vocab 2048 --dtypes bf16 --tp 1 \
            --methods megatron_ce eopd_topk --threads 1 --output "$RESULTS/gpu_loss.json"
    else
        run_step loss "$PY" bench/bench_loss.py --tokens 8192 --vocab 151936 --dtypes bf16 --tp 1 \
            --methods megatron_ce eopd_topk eopd_full --output "$RESULTS/gpu_loss.json"
    fi
fi

# ---- (4) training-iteration benchmark -------------------------------------------------------------------
if want train; then
    if [ "$DRY" = 1 ]; then
        run_step train "$PY" bench/bench_gpu_train.py --dry-run --output "$RESULTS/gpu_train.json"
    else
        run_step train "$PY" bench/bench_gpu_train.py --output "$RESULTS/gpu_train.json"
    fi
fi

# ---- (5) summary (last) ----------------------------------------------------------------------------------
"$HELPER_PY" - "$SUMMARY" "$(( $(date +%s) - START ))" <<'PY' | tee -a "$LOG"
import json, sys
path, total = sys.argv[1], int(sys.argv[2])
d = json.load(open(path))
st, res = d["steps"], d["results"]
rows, summary = [], {"total_seconds": total}
def fmt(x, spec):
    return "-" if x is None else format(x, spec)
env = res.get("env", {})
rows.append(("env", st.get("env", {}), f"torch {env.get('torch')} | {env.get('device')} | mcore {env.get('megatron_core')} | "
             f"TE {env.get('transformer_engine')} | flash_attn {env.get('flash_attn')}" if env else ""))
rows.append(("pytest", st.get("pytest", {}), st.get("pytest", {}).get("pytest_summary") or ""))
loss = res.get("loss", {})
lr = {}
for key, r in (loss.get("ratios") or {}).items():
    lr = r
    summary["loss_ratios_" + key] = r
t, f = lr.get("topk_time_vs_ce"), lr.get("full_time_vs_ce")
rows.append(("loss", st.get("loss", {}), f"topk {fmt(t, '.2f')}x CE (target <= 1.3, {'MET' if t is not None and t <= 1.3 else 'not met'}); "
             f"full {fmt(f, '.2f')}x CE (target <= 2.2)" if loss else ""))
tr = res.get("train", {})
ph = tr.get("phases", {})
p = lambda k, f: ph.get(k, {}).get(f)  # noqa: E731
mfu = p("train", "mfu")
summary.update(rollout_tokens_per_s=p("rollout", "tokens_per_s"), rollout_engine=p("rollout", "engine"),
               teacher_tokens_per_s=p("teacher", "tokens_per_s"), train_tokens_per_s=p("train", "tokens_per_s"),
               train_mfu=mfu, train_mfu_target_met=None if mfu is None else mfu >= 0.40,
               peak_gib={k: v.get("peak_gib") for k, v in ph.items()})
rows.append(("train", st.get("train", {}),
             f"rollout {fmt(p('rollout', 'tokens_per_s'), '.0f')} tok/s ({p('rollout', 'engine')}) | teacher "
             f"{fmt(p('teacher', 'tokens_per_s'), '.0f')} tok/s | train {fmt(p('train', 'tokens_per_s'), '.0f')} tok/s | "
             f"MFU {fmt(mfu, '.1%')} (target >= 40%)" if tr else ""))
d["summary"] = summary
d["finished"] = True
json.dump(d, open(path, "w"), indent=2)
print()
print(f"GPU SUITE SUMMARY (dry_run={d['dry_run']}, {total}s, results {path})")
print(f"{'step':8s} {'status':14s} {'rc':>4s} {'sec':>7s}  detail")
for name, s, detail in rows:
    if name not in st:
        continue
    print(f"{name:8s} {s.get('status', '-'):14s} {str(s.get('rc', '-')):>4s} {str(s.get('seconds', '-')):>7s}  {detail}")
if ph:
    print("train phases: " + "; ".join(f"{k} {v.get('seconds')}s peak {v.get('peak_gib')} GiB" for k, v in ph.items()))
for k, v in (tr.get("errors") or {}).items():
    print(f"train error [{k}]: {v.strip().splitlines()[-1][:160]}")
bad = [n for n, s in st.items() if s.get("status") != "ok"]
print("SUITE " + ("OK" if not bad else "NOT OK: " + ", ".join(bad)))
sys.exit(1 if bad else 0)
PY
rc=${PIPESTATUS[0]}
publish
exit "$rc"
