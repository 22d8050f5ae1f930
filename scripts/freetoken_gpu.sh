#!/usr/bin/env bash
# FreeToken 0.1.2 against vismmoe serve on the GPU machine, from the repo root (docs/freetoken.md).
#
#   scripts/freetoken_gpu.sh prepare        # install the carried wheels, make the checkpoint, measure the rates
#   scripts/freetoken_gpu.sh plan           # what `run` would start, with its time estimate
#   scripts/freetoken_gpu.sh run [ARGS]     # the bench within FT_BUDGET_S seconds, resuming what is there
#   scripts/freetoken_gpu.sh all [ARGS]     # prepare, then run with what is left of FT_CALL_S
#
# prepare: installs the wheels of FT_WHEELS (default .whl-ft, else .whl; made by scripts/freetoken_wheels.sh) into
# FT_SITE (default /tmp/site) unless freetoken already imports; makes the checkpoint FT_MODEL (default /tmp/q30-L4:
# `vismmoe make-shape --shape qwen3-30b-a3b --layers 4`, random weights, the hub layout both servers read) unless
# it exists; writes FreeToken's `ft bench bw --dtype bf16` profile unless there is one (its hybrid backend's fetch
# share comes from it; without one it fetches one miss per layer and step); measures vismmoe's rates for
# --cpu-experts auto (`vismmoe calibrate-rates`, cached) so that no server start pays for them.
#
# run: python -m vismmoe.bench.freetoken on FT_MODEL, every budget (25%, 50%, 10%, all, in that order), prompts of
# 512 and 2048 tokens, 1/4/8 clients, FreeToken offload and hybrid, vismmoe fetch only and --cpu-experts auto, one
# repetition (FT_REPS), --budget-s FT_BUDGET_S (default 540): no turn starts that would end later. Results go to
# FT_RESULTS (default /tmp/ft-results; remove it for a fresh run), which the next `run` resumes (--resume: only
# what is missing is measured), and are copied to $OUT/freetoken when OUT is set. ARGS go to the bench (e.g.
# --budgets 0.1 --systems vismmoe).
#
# all: prepare, then run with --budget-s FT_CALL_S (default 540) less the seconds prepare took.
set -euo pipefail

py=${PYTHON:-python3}
model=${FT_MODEL:-/tmp/q30-L4}
site=${FT_SITE:-/tmp/site}
results=${FT_RESULTS:-/tmp/ft-results}
wheels=${FT_WHEELS:-$([ -d .whl-ft ] && echo .whl-ft || echo .whl)}
export PYTHONPATH=$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1; shift

prepare() {
    local t0=$SECONDS
    if ! "$py" -c "import freetoken" 2>/dev/null; then
        ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $wheels: make them with" \
            "scripts/freetoken_wheels.sh $wheels on a machine with PyPI" >&2; exit 2; }
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$wheels"/*.whl
        echo "installed $(ls "$wheels"/*.whl | wc -l) wheels into $site at $((SECONDS - t0)) s"
    fi
    if [ ! -f "$model/config.json" ]; then
        "$py" -m vismmoe make-shape --shape qwen3-30b-a3b --layers 4 --device cuda --out "$model"
        echo "checkpoint $model made at $((SECONDS - t0)) s"
    fi
    local profile=${FREETOKEN_BENCHBW_PATH:-${XDG_CACHE_HOME:-$HOME/.cache}/freetoken/benchbw.json}
    if [ ! -f "$profile" ]; then
        "$py" -m freetoken.moe.benchbw --dtype bf16 || echo "ft bench bw failed: hybrid runs without a profile"
        echo "FreeToken's bandwidth profile at $((SECONDS - t0)) s"
    fi
    if "$py" -m vismmoe calibrate-rates --help >/dev/null 2>&1; then
        "$py" -m vismmoe calibrate-rates --device cuda --model "$model" \
            || echo "calibrate-rates failed: the first --cpu-experts auto server measures its rates"
        echo "vismmoe's rates at $((SECONDS - t0)) s"
    fi
    echo "prepared in $((SECONDS - t0)) s"
}

bench() {
    local budget=$1; shift
    local resume=()
    [ -f "$results/freetoken.json" ] && resume=(--resume)
    local rc=0
    "$py" -m vismmoe.bench.freetoken --model "$model" --reps "${FT_REPS:-1}" --budget-s "$budget" \
        --start-timeout 300 --out "$results" "${resume[@]}" "$@" || rc=$?
    if [ -n "${OUT:-}" ] && [ -d "$results" ]; then
        mkdir -p "$OUT/freetoken" && cp "$results"/freetoken.* "$OUT/freetoken/" 2>/dev/null || true
    fi
    return $rc
}

case $cmd in
    prepare) prepare ;;
    plan) "$py" -m vismmoe.bench.freetoken --model "$model" --reps "${FT_REPS:-1}" --budget-s "${FT_BUDGET_S:-540}" \
              --out "$results" --plan $([ -f "$results/freetoken.json" ] && echo --resume) "$@" ;;
    run) bench "${FT_BUDGET_S:-540}" "$@" ;;
    all)
        t0=$SECONDS
        prepare
        left=$(( ${FT_CALL_S:-540} - (SECONDS - t0) ))
        [ "$left" -gt 60 ] || { echo "prepare took $((SECONDS - t0)) s: no time left for the bench; call run" >&2; exit 0; }
        bench "$left" "$@" ;;
    *) usage ;;
esac
