#!/usr/bin/env bash
# The one command to send to the GPU machine:  bash scripts/gpu_check.sh OUTDIR
#
# Builds the extension with all cores, runs the GPU tests, runs small cases of every CUDA kernel
# under compute-sanitizer (memcheck, then racecheck: scripts/sanitize_cases.py), runs the kernel benchmarks,
# writes logs and JSON to OUTDIR and prints a short summary table last. The default run no longer fits
# one 10-minute device call (the GPU tests alone take ~8 minutes): split it with the variables below.
# Environment: TORCH_CUDA_ARCH_LIST (default: the GPU's own arch), QUANTKERN_SKIP_BENCH=1,
# QUANTKERN_BENCH (benchmarks to run, default "activation_quant w4a16 e2e"), QUANTKERN_E2E_CONFIG
# (default llama3-8b), QUANTKERN_E2E_ARGS (more flags of bench_e2e.py, e.g. "--compile --fuse-projections"),
# QUANTKERN_W4A16_ARGS (default --quick; " " for every shape), QUANTKERN_SKIP_BUILD=1 and
# QUANTKERN_SKIP_TESTS=1 (a second call on a still-warm machine: benchmarks only), QUANTKERN_TESTS
# (test files to run, default: all that need no package registry), QUANTKERN_SKIP_SANITIZERS=1,
# QUANTKERN_SANITIZE_CASES (case groups of scripts/sanitize_cases.py, default all; e.g. "int_gemm"),
# QUANTKERN_COMMIT (the commit the benchmarks' JSON records: the GPU machine's copy has no .git),
# QUANTKERN_TESTS_PER_FILE=1 (one pytest run, log and junit XML per test file: a failure or a cut-off costs one
# file's results, and the summary has a line per file; each run pays pytest's and torch's start-up again),
# QUANTKERN_DEADLINE_S (seconds from the script's start after which no further step starts, a running one going
# on: a device call's limit then leaves the summary intact; the test files not reached go to
# OUTDIR/tests_not_run.txt, ready to be passed as QUANTKERN_TESTS in the next call).
# Exit status: 0 when every step ran and passed, 1 otherwise (the summary table says which failed or did not run).
set -uo pipefail
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# The default tests: every test but those that need the built-in model's wheel (no package registry on the GPU
# machine). QUANTKERN_TESTS_PER_FILE=1: the test files, checked before anything is built.
NEEDS_MODEL_WHEEL=" tests/test_builtin_model.py tests/test_cli.py "
DEFAULT_TESTS="tests$(for file in $NEEDS_MODEL_WHEEL; do printf ' --ignore=%s' "$file"; done)"
TEST_FILES=()
if [ "${QUANTKERN_TESTS_PER_FILE:-0}" = 1 ]; then
    if [ -n "${QUANTKERN_TESTS:-}" ]; then
        read -r -d '' -a TEST_FILES <<< "$QUANTKERN_TESTS" || true  # words on any lines (tests_not_run.txt's)
    else
        for file in tests/test_*.py; do
            [[ $NEEDS_MODEL_WHEEL == *" $file "* ]] || TEST_FILES+=("$file")
        done
    fi
    for file in "${TEST_FILES[@]}"; do
        [ -f "$file" ] || { echo "QUANTKERN_TESTS_PER_FILE=1 takes test files; no file $file" >&2; exit 1; }
    done
fi
declare -A STATUS
ORDER=()  # step names in the order they came
NOT_RUN="NOT RUN (deadline)"  # a step's status when the deadline kept it from starting

past_deadline() { [ -n "${QUANTKERN_DEADLINE_S:-}" ] && [ "$SECONDS" -ge "$QUANTKERN_DEADLINE_S" ]; }

step() {  # step NAME LOGFILE COMMAND...: run, log, remember pass/fail and time (or that the deadline skipped it)
    local name=$1 log=$2; shift 2
    local start=$SECONDS
    ORDER+=("$name")
    if past_deadline; then
        echo "=== $name: not run (past QUANTKERN_DEADLINE_S=$QUANTKERN_DEADLINE_S at ${SECONDS}s)"
        STATUS[$name]=$NOT_RUN
        return 1
    fi
    echo "=== $name: $*"
    "$@" >"$OUTDIR/$log" 2>&1
    local rc=$?
    tail -n 25 "$OUTDIR/$log"
    STATUS[$name]="$([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") $((SECONDS - start))s"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
if [ -z "${QUANTKERN_COMMIT:-}" ] && ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "WARNING: QUANTKERN_COMMIT is not set and there is no .git: the benchmarks' JSON will record commit null"
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    cap=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    [ "$cap" = "9.0" ] && cap="9.0a"
    export TORCH_CUDA_ARCH_LIST=$cap
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if [ "${QUANTKERN_SKIP_BUILD:-0}" != 1 ]; then
    step build build.log env QUANTKERN_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -v -e . \
        || { echo "build failed: see $OUTDIR/build.log"; exit 1; }
    grep -E "ptxas info|spill" "$OUTDIR/build.log" | sort -u > "$OUTDIR/ptxas.txt"
    # ptxas serializing wgmmas (csrc/w4a16_wgmma.cu's header says what causes it) is a performance bug.
    grep -E "C751[345]|C7520" "$OUTDIR/ptxas.txt" && echo "WARNING: ptxas serialized wgmma instructions (above)"
fi
step info info.txt $PY -m quantkern info
if [ "${QUANTKERN_SKIP_TESTS:-0}" != 1 ]; then
# (QUANTKERN_TRITON_AUTOTUNE=0: one Triton config per kernel, so tests don't spend minutes autotuning.)
if [ "${QUANTKERN_TESTS_PER_FILE:-0}" = 1 ]; then
    : > "$OUTDIR/tests_not_run.txt"
    for file in "${TEST_FILES[@]}"; do
        base=$(basename "$file" .py)
        step "tests:$base" "tests_$base.log" env QUANTKERN_TRITON_AUTOTUNE=0 $PY -m pytest -q -rs \
            --junitxml="$OUTDIR/tests_$base.xml" "$file"
        [ "${STATUS[tests:$base]}" = "$NOT_RUN" ] && echo "$file" >> "$OUTDIR/tests_not_run.txt"
    done
else
    step tests tests.log env QUANTKERN_TRITON_AUTOTUNE=0 $PY -m pytest -q -rs --junitxml="$OUTDIR/tests.xml" \
        ${QUANTKERN_TESTS:-$DEFAULT_TESTS}
fi
fi
if [ "${QUANTKERN_SKIP_TESTS:-0}" != 1 ] && [ "${QUANTKERN_SKIP_SANITIZERS:-0}" != 1 ]; then
SAN="compute-sanitizer --target-processes all --error-exitcode 99"
step memcheck memcheck.log $SAN --tool memcheck $PY scripts/sanitize_cases.py ${QUANTKERN_SANITIZE_CASES:-}
step racecheck racecheck.log $SAN --tool racecheck $PY scripts/sanitize_cases.py ${QUANTKERN_SANITIZE_CASES:-}
fi
BENCHES=${QUANTKERN_BENCH:-activation_quant w4a16 e2e}
[ "${QUANTKERN_SKIP_BENCH:-0}" = 1 ] && BENCHES=""
for bench in $BENCHES; do
    case $bench in
        e2e) extra="--config ${QUANTKERN_E2E_CONFIG:-llama3-8b} ${QUANTKERN_E2E_ARGS:-}" ;;
        w4a16) extra="${QUANTKERN_W4A16_ARGS:---quick}" ;;
        int_gemm) extra="${QUANTKERN_INT_GEMM_ARGS:-}" ;;  # QUANTKERN_BENCH="int_gemm"; args e.g. --quick, --all-shapes
        hadamard)  # QUANTKERN_BENCH="hadamard": builds the optional peer from .peers/ (git-ignored; name it in carry)
            if [ -d .peers/fast-hadamard-transform ] && ! $PY -c "import fast_hadamard_transform" 2>/dev/null; then
                step peer_fht peer_fht.log env FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE $PY -m pip install \
                    --no-build-isolation --no-deps -v ./.peers/fast-hadamard-transform
            fi
            extra="${QUANTKERN_HADAMARD_ARGS:---no-triton}" ;;
        *) extra="" ;;
    esac
    step "bench_$bench" "bench_$bench.log" $PY "benchmarks/bench_$bench.py" --json "$OUTDIR/bench_$bench.json" $extra
done

echo
echo "=== summary ($(head -n1 "$OUTDIR/gpu.txt"), archs $TORCH_CUDA_ARCH_LIST)"
pytest_result() { grep -hE "passed|failed|error|no tests ran" "$1" | tail -n1; }  # pytest's last line in log $1
[ -f "$OUTDIR/tests.log" ] && pytest_result "$OUTDIR/tests.log"
for name in "${ORDER[@]}"; do  # QUANTKERN_TESTS_PER_FILE=1: one line per file, in the order run
    log="$OUTDIR/tests_${name#tests:}.log"
    [ "${name#tests:}" != "$name" ] && [ -f "$log" ] || continue
    printf '%-40s %s\n' "$name" "$(pytest_result "$log")"
done
if [ -s "$OUTDIR/tests_not_run.txt" ]; then
    echo "test files not run (deadline): $(tr '\n' ' ' < "$OUTDIR/tests_not_run.txt")"
fi
[ -f "$OUTDIR/memcheck.log" ] \
    && grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR/memcheck.log" "$OUTDIR/racecheck.log" | sort | uniq -c
for bench in $BENCHES; do  # each benchmark prints its table last, after a blank line
    [ -f "$OUTDIR/bench_$bench.log" ] && awk 'BEGIN{RS=""} {last=$0} END{print last}' "$OUTDIR/bench_$bench.log" && echo
done
printf '%-40s %s\n' step result
for name in "${ORDER[@]}"; do
    printf '%-40s %s\n' "$name" "${STATUS[$name]}"
done
# (The loop's last test used to be the exit status: 0 with failed tests, 1 when the last step was skipped.)
failed=0
for name in "${!STATUS[@]}"; do
    case ${STATUS[$name]} in PASS*) ;; *) failed=1 ;; esac
done
exit "$failed"
