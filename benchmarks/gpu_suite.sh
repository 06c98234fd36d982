#!/usr/bin/env bash
# fastdiff's one prepared script for a lent GPU machine: install, GPU tests, benchmarks, report.
#
#   OUT=<results dir> bash benchmarks/gpu_suite.sh             # on the GPU machine
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh --dry-run        # on a CPU machine
#
# Sections, each under its own time limit (seconds, overridable from the environment); a
# section that fails or runs out of time is reported and the next one still runs:
#   env        nvidia-smi, torch / triton / CUDA versions
#   install    pip install --no-deps --no-build-isolation -e .   (builds the C++/CUDA
#              extension, torch being importable)                    INSTALL_LIMIT_S=240
#   gpu tests  pytest -m gpu tests/                                  GPU_TESTS_LIMIT_S=150
#   quickstart the README's main job on this GPU: torchrun -m fastdiff.train (digits preset,
#              compiled, fused kernels), its log and sample grid to $OUT  QUICKSTART_LIMIT_S=150
#   benchmarks one pytest-benchmark run per benchmarks/bench_*.py, the training step first,
#              all within BENCH_BUDGET_S=360 (the train step alone at most TRAIN_STEP_LIMIT_S=240).
#              One JSON per module: pytest-benchmark writes its JSON when the session ends,
#              and a module stopped at its limit (SIGINT) still writes what finished, so one
#              slow module cannot cost the others' results. On the GPU machine only the
#              `gpu` benchmarks run (the CPU ones measure CI's machine, not this one).
#              BENCH_SELECT="bench_train_step bench_attention" runs only those modules.
#   report     benchmarks/report.py: merged JSON, markdown table, PNG chart; printed last.
# --dry-run (a CPU machine): no install; the GPU tests and benchmarks skip with a reason and
# the CPU benchmarks run, so everything but the GPU work is exercised.
#
# Under $OUT (at most 8 files come back from the device tool): suite.log (all output),
# install.log, quickstart.log, quickstart_grid.png, bench.json (every module's results
# merged), results.md, speedups.png.
# Compiled kernels are cached outside $OUT (/tmp), so a rerun on the same machine is warm.
set -uo pipefail

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: OUT=<dir> bash benchmarks/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder for the results}"
INSTALL_LIMIT_S=${INSTALL_LIMIT_S:-240}
GPU_TESTS_LIMIT_S=${GPU_TESTS_LIMIT_S:-150}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-360}
TRAIN_STEP_LIMIT_S=${TRAIN_STEP_LIMIT_S:-240}
QUICKSTART_LIMIT_S=${QUICKSTART_LIMIT_S:-150}

OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)  # absolute: the script moves to the repo root
cd "$(dirname "$0")/.."
WORK=/tmp/fastdiff-gpu-suite          # per-module JSONs (not $OUT: its file count is capped)
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastdiff-inductor-cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # parallel compile of the extension (ninja)
PY=${PYTHON:-python3}                # the device machine's python3 is the one with torch
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

FAILED=()
SUITE_START=$(date +%s)

# run_limited NAME SECONDS CMD...: run CMD under a time limit (SIGINT first, so pytest still
# writes its results; SIGKILL 30 s later), log its exit status, remember failures.
# Exit status 5 from pytest (nothing selected) is not a failure.
run_limited() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo
    echo "=== $name (limit ${limit} s): $*"
    timeout -s INT -k 30 "$limit" "$@"
    rc=$?
    case $rc in
        0) echo "=== $name: ok ($(( $(date +%s) - start )) s)" ;;
        5) echo "=== $name: nothing selected ($(( $(date +%s) - start )) s)" ;;
        124|137) echo "=== $name: STOPPED at its ${limit} s limit"; FAILED+=("$name: time limit ${limit} s") ;;
        *) echo "=== $name: FAILED with exit status $rc ($(( $(date +%s) - start )) s)"; FAILED+=("$name: exit $rc") ;;
    esac
    return 0
}

environment() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi
    "$PY" - <<'EOF'
import platform
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}, nvcc on PATH: {__import__('shutil').which('nvcc') or 'no'}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
else:
    print("GPU: none visible to torch")
EOF
}

install() {
    # Output to its own log; its tail here shows whether the extension was built.
    "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/install.log"
    "$PY" -c "from fastdiff.optim import _ext, extension_available as ok; \
print('fastdiff extension:', 'loaded' if ok() else 'NOT available', \
'| CUDA kernels:', _ext.has_cuda_kernels() if ok() else '-')"
    return $rc
}

quickstart() {
    # The README's main job, unchanged but for its run folder; its log tail shows img/s.
    # SIGTERM 20 s before the section's limit: the trainer checkpoints and exits (preemption).
    local run="$WORK/quickstart"
    timeout -s TERM $(( QUICKSTART_LIMIT_S - 20 )) "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m fastdiff.train --log_dir "$run" \
        >"$OUT/quickstart.log" 2>&1
    local rc=$?
    grep -E "kernels:|model wrapping|precision:|images_per_sec|training (finished|stopped)|error" \
        "$OUT/quickstart.log" | tail -n 12
    [ -f "$run/samples_grid.png" ] && cp "$run/samples_grid.png" "$OUT/quickstart_grid.png"
    return $rc
}

benchmarks() {
    local modules mod limit left json marker=()
    [ "$DRY_RUN" = 1 ] || marker=(-m gpu)
    if [ -n "${BENCH_SELECT:-}" ]; then
        modules=($BENCH_SELECT)
    else
        modules=(bench_train_step)
        for f in benchmarks/bench_*.py; do
            mod=$(basename "$f" .py)
            [ "$mod" = bench_train_step ] || modules+=("$mod")
        done
    fi
    local deadline=$(( $(date +%s) + BENCH_BUDGET_S ))
    for mod in "${modules[@]}"; do
        if [ ! -f "benchmarks/$mod.py" ]; then
            echo "=== $mod: no such module"; FAILED+=("$mod: no such module"); continue
        fi
        left=$(( deadline - $(date +%s) ))
        if [ "$left" -le 10 ]; then
            echo "=== $mod: NOT RUN, the ${BENCH_BUDGET_S} s benchmark budget is spent"
            FAILED+=("$mod: not run (budget spent)"); continue
        fi
        limit=$left
        [ "$mod" = bench_train_step ] && [ "$limit" -gt "$TRAIN_STEP_LIMIT_S" ] && limit=$TRAIN_STEP_LIMIT_S
        json="$WORK/$mod.json"
        run_limited "$mod" "$limit" "${PYTEST[@]}" "benchmarks/$mod.py" --benchmark-only \
            --benchmark-json="$json" "${marker[@]}"
        # pytest-benchmark leaves an empty file when every benchmark was skipped.
        [ -s "$json" ] || { rm -f "$json"; echo "=== $mod: no benchmark ran, no results"; }
    done
}

main() {
    echo "fastdiff gpu_suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), $( [ "$DRY_RUN" = 1 ] && echo 'DRY RUN (CPU)' || echo 'GPU run'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    run_limited env 60 bash -c environment
    if [ "$DRY_RUN" = 1 ]; then
        echo; echo "=== install: skipped (dry run)"
    else
        run_limited install "$INSTALL_LIMIT_S" bash -c install
    fi
    run_limited "gpu tests" "$GPU_TESTS_LIMIT_S" "${PYTEST[@]}" -m gpu tests/
    if [ "$DRY_RUN" = 1 ]; then
        echo; echo "=== quickstart: skipped (dry run)"
    else
        run_limited quickstart "$QUICKSTART_LIMIT_S" bash -c quickstart
    fi
    benchmarks

    echo
    echo "=== report"
    local jsons=("$WORK"/*.json)
    if [ -e "${jsons[0]}" ]; then
        "$PY" benchmarks/report.py "${jsons[@]}" --merge-json "$OUT/bench.json" \
            --md "$OUT/results.md" --png "$OUT/speedups.png" >/dev/null
        [ -f "$OUT/results.md" ] || FAILED+=("report: no markdown written")
    else
        echo "no benchmark JSON was written"; FAILED+=("report: no benchmark JSON")
    fi

    echo
    echo "=== summary: $(( $(date +%s) - SUITE_START )) s in all"
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "every section passed"
    else
        printf 'FAILED: %s\n' "${FAILED[@]}"
    fi
    echo
    [ -f "$OUT/results.md" ] && cat "$OUT/results.md"
    [ ${#FAILED[@]} -eq 0 ]
}

# `environment` and `install` run under `timeout` in a child bash: export them and their variables.
export -f environment install quickstart
export OUT PY WORK QUICKSTART_LIMIT_S
main 2>&1 | tee "$OUT/suite.log"
