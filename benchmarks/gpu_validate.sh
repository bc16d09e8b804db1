#!/usr/bin/env bash
# One-shot GPU validation of fastattn, for a machine with a CUDA GPU and no internet where
# torch, triton, ninja, pybind11 and pytest are installed. From the repository root:
#
#     OUT=/some/folder bash benchmarks/gpu_validate.sh
#
# Stages, each under its own `timeout`, each failure reported without stopping the others:
#   env      nvidia-smi and `fastattn info` (versions, devices, backend availability)
#   install  pip install --no-deps --no-build-isolation -e .
#   build    fastattn build (the CUDA extension, JIT with ninja)
#   tests    pytest tests (the GPU test suite), one line per test in the log
#   bench    fastattn bench all --quick --device cuda (sizes that fill an H200), time-budgeted
# The whole run fits in FASTATTN_VALIDATE_BUDGET_S seconds (default 470, under 8 minutes):
# every stage has a cap; time a stage leaves unused goes to the later ones.
#
# Output, at most 8 plain files directly in $OUT (default ./gpu_validate_out):
#   summary.md     stage table, pytest summary and failures, the benchmark tables
#   results.json   every benchmark row with the environment (GPU name, versions, commit)
#   logs.tar.gz    every stage's log, results.csv, table.md, pytest's junit xml
#   attention.png norm.png ffn.png model.png   benchmark plots
# The stage table and the benchmark's short table are printed last.
#
# DRY_RUN=1 replaces each stage by a small CPU stand-in (no pip install, no CUDA build, one
# test file, a tiny CPU benchmark) to check this script's plumbing on a machine without a GPU.
# Other knobs: PYTHON (default python3, else python), FASTATTN_VALIDATE_STAGES (which stages to
# run, default "env install build tests bench"), FASTATTN_VALIDATE_CAPS (stage caps in seconds,
# default "env=15 install=30 build=180 tests=100 bench=135").

set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-$REPO/gpu_validate_out}
BUDGET=${FASTATTN_VALIDATE_BUDGET_S:-470}
STAGES=${FASTATTN_VALIDATE_STAGES:-"env install build tests bench"}
DRY_RUN=${DRY_RUN:-0}
START=$(date +%s)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastattn_validate.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS" "$WORK/bench"
TABLE=$WORK/stages.md
printf '| stage | status | seconds | limit s | note |\n|---|---|---|---|---|\n' >"$TABLE"
FAILURES=0

# Caps in seconds, in stage order; a stage may use its cap plus what earlier stages left.
declare -A CAP=([env]=15 [install]=30 [build]=180 [tests]=100 [bench]=135)
for kv in ${FASTATTN_VALIDATE_CAPS:-}; do CAP[${kv%%=*}]=${kv#*=}; done
ORDER=(env install build tests bench)
STATUS_build=

reserve_after() {  # sum of the caps of the selected stages after $1
    local after=0 seen=0 s
    for s in "${ORDER[@]}"; do
        if [ "$seen" = 1 ] && [[ " $STAGES " == *" $s "* ]]; then after=$((after + CAP[$s])); fi
        if [ "$s" = "$1" ]; then seen=1; fi
    done
    echo "$after"
}

stage_limit() {  # seconds stage $1 may run
    local now left
    now=$(date +%s)
    left=$((BUDGET - (now - START) - $(reserve_after "$1")))
    echo "$left"
}

# run_stage NAME NOTE_COMMAND -- COMMAND...: runs COMMAND under timeout, logs to $LOGS/NAME.log,
# adds a row to the stage table. NOTE_COMMAND (a shell snippet reading $log) gives the note.
run_stage() {
    local name=$1 note_cmd=$2
    shift 3
    local log=$LOGS/$name.log limit rc status begin seconds note
    if [[ " $STAGES " != *" $name "* ]]; then
        printf '| %s | skipped | 0 | - | not selected (FASTATTN_VALIDATE_STAGES) |\n' "$name" >>"$TABLE"
        return
    fi
    limit=$(stage_limit "$name")
    if [ "$limit" -lt 10 ]; then
        printf '| %s | skipped | 0 | %s | no time left in the %ss budget |\n' "$name" "$limit" "$BUDGET" >>"$TABLE"
        FAILURES=$((FAILURES + 1))
        printf -v "STATUS_$name" '%s' "failed: no time left"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOGS/commands.log"
    begin=$(date +%s)
    STAGE_LIMIT=$limit timeout -k 15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - begin))
    if [ "$rc" = 0 ]; then
        status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="failed: timed out"
        FAILURES=$((FAILURES + 1))
    else
        status="failed: exit $rc"
        FAILURES=$((FAILURES + 1))
    fi
    note=$(eval "$note_cmd" 2>/dev/null | tr '\n|' ' /' | cut -c1-200)
    printf '| %s | %s | %s | %s | %s |\n' "$name" "$status" "$seconds" "$limit" "$note" >>"$TABLE"
    echo "   $status after ${seconds}s"
    printf -v "STATUS_$name" '%s' "$status"
}

last_line='tail -n 1 "$log"'
env_note='grep -E "^(torch |triton |cuda:0|cuda devices)" "$log" | tr -s " "'
bench_note='{ grep -E "^rows:" "$log" || tail -n 1 "$log"; } | tail -n 1'
pytest_note='grep -E "^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$log" | tail -n 1; printf "(%s passed, %s failed so far) " "$(grep -c " PASSED" "$log")" "$(grep -c " FAILED" "$log")"'

if [ "$DRY_RUN" = 1 ]; then
    run_stage env "$env_note" -- "$PY" -m fastattn info
    run_stage install "$last_line" -- "$PY" -c "import fastattn; print('dry run: import fastattn', fastattn.__version__, 'instead of pip install -e .')"
    run_stage build "$last_line" -- "$PY" -m fastattn build --help
    run_stage tests "$pytest_note" -- "$PY" -m pytest "$REPO/tests/test_bench.py" -v -p no:cacheprovider -k formula \
        --junitxml="$WORK/junit.xml"
    run_stage bench "$bench_note" -- bash -c '"$0" -m fastattn bench attention --preset smoke --device cpu --providers naive \
        --skip-providers compile --out "$1" --no-progress --budget $((STAGE_LIMIT - 20))' "$PY" "$WORK/bench"
else
    run_stage env "$env_note" -- bash -c 'nvidia-smi; "$0" -m fastattn info' "$PY"
    run_stage install "$last_line" -- "$PY" -m pip install --no-deps --no-build-isolation -e "$REPO"
    run_stage build "$last_line" -- "$PY" -m fastattn build
    # FASTATTN_IN_GPU_VALIDATE: tests/test_bench.py skips its dry run of this very script
    run_stage tests "$pytest_note" -- env FASTATTN_IN_GPU_VALIDATE=1 "$PY" -m pytest "$REPO/tests" -v -rfE \
        -p no:cacheprovider --junitxml="$WORK/junit.xml"
    # --quick: the H200-filling sizes at fewer points; the reference backend (the float64
    # oracle's formulas) is left out of the timing, and so is the cuda backend when its build
    # failed (its first call would start the build again). --budget leaves 40 s of the stage
    # for the measurement in flight, the tables and the plots.
    SKIP=fastattn-reference
    case $STATUS_build in failed*) SKIP=$SKIP,fastattn-cuda ;; esac
    run_stage bench "$bench_note" -- bash -c '"$0" -m fastattn bench all --quick --device cuda --out "$1" --no-progress \
        --skip-providers "$2" --budget $((STAGE_LIMIT - 40))' "$PY" "$WORK/bench" "$SKIP"
fi

# ---- bundle: at most 8 files, directly under $OUT --------------------------------------------
for f in results.csv table.md; do [ -f "$WORK/bench/$f" ] && cp "$WORK/bench/$f" "$LOGS/"; done
[ -f "$WORK/junit.xml" ] && cp "$WORK/junit.xml" "$LOGS/"
[ -f "$WORK/bench/results.json" ] && cp "$WORK/bench/results.json" "$OUT/results.json"
for op in attention norm ffn model; do
    [ -f "$WORK/bench/$op.png" ] && cp "$WORK/bench/$op.png" "$OUT/$op.png"
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs

BENCH_SHORT=$WORK/bench_short.txt
# the benchmark prints its short table last, after the "wrote"/"not run" lines
sed -n '/^op  *case  *mode/,$p' "$LOGS/bench.log" 2>/dev/null >"$BENCH_SHORT"
{
    echo "# fastattn GPU validation"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), total $(($(date +%s) - START)) s of a ${BUDGET} s budget"
    gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    echo "- GPU: ${gpu:-none found by nvidia-smi}"
    echo "- commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "- dry run: $DRY_RUN"
    echo
    echo "## Stages"
    echo
    cat "$TABLE"
    echo
    echo "## pytest failures"
    echo
    echo '```'
    grep -E " FAILED|^FAILED|^ERROR" "$LOGS/tests.log" 2>/dev/null | head -n 60
    tail -n 3 "$LOGS/tests.log" 2>/dev/null
    echo '```'
    echo
    echo "## Benchmark (largest case per op, forward+backward)"
    echo
    echo '```'
    cat "$BENCH_SHORT"
    echo '```'
    echo
    [ -f "$WORK/bench/table.md" ] && sed 's/^#/##/' "$WORK/bench/table.md"
} >"$OUT/summary.md"

echo
cat "$BENCH_SHORT"
echo
cat "$TABLE"
rm -rf "$WORK"
[ "$FAILURES" = 0 ]
