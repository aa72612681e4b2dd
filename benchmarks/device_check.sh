#!/usr/bin/env bash
# The device check: the performance figures of one accelerator in one JSON object on stdout
# (progress on stderr), within a time budget (default 470 s, under 8 minutes).
#
#   bash benchmarks/device_check.sh                      # from anywhere; runs in the repo root
#   PYTHON=/path/to/venv/bin/python bash benchmarks/device_check.sh
#   DEVICE_CHECK_QUICK=1 bash benchmarks/device_check.sh # tiny sizes: checks the script on a CPU
#
# It assumes `$PYTHON` (default: python, else python3) already has the project and jax for
# the accelerator installed (e.g. jax[cuda12]); it installs nothing. Parts, each its own
# process under `timeout` (a part that fails or runs out of time is reported as
# {"error": ...} and the others still run):
#   env               jax's version, backend, device kinds and count, package versions
#   population_32     python -m benchmarks.population at P = 32: vmap vs loop vs standalone
#                     (--chunk_size 0: all P in one vmap, as suits accelerators;
#                     --standalone_candidates 2, extrapolated)
#   population_128    the same at P = 128
#   training_default  supernet and final-training steps/s of configs/default.py, random data
#   smoke             python -m launch.search --config=configs/smoke.py in a fresh workdir with
#                     the compilation cache off (--compilation_cache_dir=): wall seconds and the
#                     stage timing of its results/summary.json
#   training_utkface  as training_default for configs/utkface.py (the accelerator recipe, 64 px)
# Each part gets min(its cap, the budget left); parts run in the order above. A part that
# timed out can be rerun alone, e.g. DEVICE_CHECK_PARTS="env smoke".
#
# Environment: DEVICE_CHECK_BUDGET_S (total seconds), DEVICE_CHECK_PARTS (a subset, in
# order, e.g. "env smoke"), DEVICE_CHECK_CHUNK (the population's --chunk_size, default 0),
# DEVICE_CHECK_KEEP=DIR (copy every part's stdout/stderr and device_check.json, the merged
# object, there; e.g. DEVICE_CHECK_KEEP=$OUT), DEVICE_CHECK_QUICK=1
# (P = 4 and 8 on 250 images, 1 standalone candidate, training_smoke (configs/smoke.py) in
# 2-step blocks, no smoke search unless DEVICE_CHECK_PARTS names it; budget 300 s).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=$(command -v python || command -v python3)
fi
QUICK=${DEVICE_CHECK_QUICK:-0}
CHUNK=${DEVICE_CHECK_CHUNK:-0}
if [[ "$QUICK" == 1 ]]; then
  BUDGET=${DEVICE_CHECK_BUDGET_S:-300}
  PARTS=${DEVICE_CHECK_PARTS:-env population_4 population_8 training_smoke}
  POPULATION_FLAGS=(--images 250 --standalone_candidates 1 --matmul_size 512 --matmul_repeats 3)
  TRAIN_FLAGS=(--steps 2 --blocks 2)
else
  BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
  PARTS=${DEVICE_CHECK_PARTS:-env population_32 population_128 training_default smoke training_utkface}
  POPULATION_FLAGS=(--standalone_candidates 2)
  TRAIN_FLAGS=(--steps 20 --blocks 3)
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
keep() {
  if [[ -n "${DEVICE_CHECK_KEEP:-}" ]]; then
    mkdir -p "$DEVICE_CHECK_KEEP"
    cp "$tmp"/*.out "$tmp"/*.err "$tmp"/*.json "$DEVICE_CHECK_KEEP"/ 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap keep EXIT

log() { echo "[device_check $(date +%H:%M:%S)] $*" >&2; }
now() { date +%s.%N; }

begin=$SECONDS
now >"$tmp/begin"
echo "$QUICK" >"$tmp/quick"
echo "$BUDGET" >"$tmp/budget"
echo "$PARTS" >"$tmp/parts"
git rev-parse --short HEAD >"$tmp/commit" 2>/dev/null || rm -f "$tmp/commit"

# run_part NAME CAP COMMAND...: COMMAND's stdout to NAME.out, stderr to NAME.err, under
# timeout min(CAP, budget left - 10 s); its exit status, limit and start/end times beside.
run_part() {
  local name=$1 cap=$2 left limit rc=0
  shift 2
  left=$((BUDGET - (SECONDS - begin) - 10))
  limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    log "$name: skipped, ${left} s of the ${BUDGET} s budget left"
    echo "no time left in the ${BUDGET} s budget" >"$tmp/$name.skipped"
    return 0
  fi
  log "$name (limit ${limit} s): $*"
  echo "$limit" >"$tmp/$name.limit"
  now >"$tmp/$name.start"
  timeout --kill-after=10 "$limit" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" || rc=$?
  now >"$tmp/$name.end"
  echo "$rc" >"$tmp/$name.rc"
  if ((rc == 0)); then
    log "$name: done"
  else
    local why="exit status $rc"
    if ((rc == 124 || rc == 137)); then why="timed out after $limit s"; fi
    log "$name: $why; last lines of its stderr:"
    tail -n 5 "$tmp/$name.err" >&2 || true
  fi
}

for part in $PARTS; do
  case "$part" in
    env)
      run_part env 60 "$PYTHON" -m benchmarks.device_check env ;;
    population_*)
      size=${part#population_}
      cap=$((size >= 128 ? 140 : 100))
      run_part "$part" "$cap" "$PYTHON" -m benchmarks.population --population "$size" \
        --chunk_size "$CHUNK" "${POPULATION_FLAGS[@]}" ;;
    training_*)
      config=${part#training_}
      cap=$([[ "$config" == default ]] && echo 80 || echo 120)
      if [[ "$QUICK" == 1 ]]; then cap=150; fi  # a busy CPU compiles for a minute
      run_part "$part" "$cap" "$PYTHON" -m benchmarks.device_check train --config "$config" \
        "${TRAIN_FLAGS[@]}" ;;
    smoke)
      command=("$PYTHON" -m launch.search "--workdir=$tmp/smoke_workdir"
               --config=configs/smoke.py --compilation_cache_dir=)
      echo "python -m launch.search --workdir=<fresh tmp dir> --config=configs/smoke.py" \
        "--compilation_cache_dir=" >"$tmp/smoke.command"
      run_part smoke 330 "${command[@]}" ;;
    *)
      log "unknown part $part (env, population_<P>, training_<config>, smoke)"
      echo "unknown part" >"$tmp/$part.skipped" ;;
  esac
done

now >"$tmp/finish"
"$PYTHON" -m benchmarks.device_check merge "$tmp" >"$tmp/device_check.json"
cat "$tmp/device_check.json"
log "done in $((SECONDS - begin)) s"
