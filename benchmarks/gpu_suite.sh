#!/usr/bin/env bash
# fastdiff's one prepared command for a lent GPU machine: install, smoke checks, benchmarks,
# the other GPU tests, the quickstart; what it measured lands in $OUT after every section.
#
#   bash benchmarks/gpu_suite.sh --plan                      # the sections and their limits
#   OUT=<results dir> bash benchmarks/gpu_suite.sh           # on the GPU machine
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh --dry-run      # on a CPU machine
#
# Why it is built this way: the GPU machine gives one command at most 600 s and 15 minutes in
# all (its start included), so the whole suite must fit in 480 s with the kill grace counted,
# the most valuable numbers must come first, and a kill must lose only the running section.
#
# * Sections run in a fixed order (see PLAN below): env, install, build_ext, smoke, kernel
#   benchmarks, the ImageNet-64 train step (fastdiff first, then each baseline in its own
#   process), the other GPU tests, the quickstart, the final report. Each runs under its own
#   limit: SIGINT at the limit (pytest then still writes what finished), SIGKILL GRACE_S
#   later. A section's deadline is the suite's start plus the planned time (limit + grace)
#   of every section up to it, so time a section leaves unused passes to the next ones and
#   the suite can never run longer than the plan's total. A section that fails or is cut off
#   is reported and the next one still runs.
# * After every section benchmarks/report.py merges the section's benchmark JSON
#   ($OUT/parts/<section>.json, removed once merged) into $OUT/bench.json and rewrites
#   $OUT/results.md, the section table first. Under $OUT, at most 8 files come back from the
#   device tool: suite.log (all output), install.log, quickstart.log, quickstart_grid.png,
#   bench.json, results.md, speedups.png. A part a killed run left in $OUT/parts is merged by
#   the next report into the same $OUT (a rerun's rows replace the old ones).
# * Install cannot lose the kernels: the package is installed with the extension skipped
#   (FASTDIFF_SKIP_EXT=1), then the C++/CUDA extension is built in its own section; if that
#   fails the section says so and fastdiff/optim/_ext.py's loader (just-in-time build, else
#   the foreach path) runs, its log line saying which.
# * --dry-run (a CPU machine): no install, no extension build, no quickstart (each reported
#   as skipped with the reason); the GPU tests and GPU benchmarks skip, the CPU benchmarks
#   run; results.md is written as on the GPU.
#
# Environment: <SECTION>_LIMIT_S overrides a section's limit (e.g. SMOKE_LIMIT_S=120);
# SECTIONS="env smoke bench_attention" runs only those (the plan then totals only them);
# PYTHON (default python3: the device machine's python3 is the one with torch).
# Compiled kernels are cached outside $OUT (/tmp), so a rerun on the same machine is warm.
set -uo pipefail

GRACE_S=3           # SIGINT at the limit, SIGKILL this much later
MIN_SECTION_S=5     # a section left less than this is not started
MAX_TOTAL_S=480     # the device command's 600 s, less room for a short follow-up command
# name|limit in seconds|what runs. Order matters: the most valuable results come first.
PLAN=(
    "env|15|nvidia-smi; Python, torch, triton and CUDA versions; the GPU torch sees"
    "install|15|FASTDIFF_SKIP_EXT=1 pip install --no-deps --no-build-isolation -e . (package only)"
    "build_ext|55|setup.py build_ext --inplace (C++/CUDA Adam+EMA), then the loader says which path runs"
    "smoke|90|tests/test_gpu_smoke.py: GroupNorm+SiLU, attention, Adam+EMA vs references; compiled bf16 train steps, 6 under sync-debug 'error'"
    "bench_group_norm_silu|30|benchmarks/bench_group_norm_silu.py (fastdiff vs eager vs torch.compile)"
    "bench_attention|25|benchmarks/bench_attention.py (fastdiff vs SDPA vs GD's einsum)"
    "bench_adam_ema|15|benchmarks/bench_adam_ema.py (fused Adam+EMA vs AdamW + EMA)"
    "train_step_fastdiff|85|bench_train_step.py ImageNet-64 step: fastdiff (compiled, fused kernels and optimizer)"
    "train_step_stock_pytorch|25|bench_train_step.py ImageNet-64 step: stock PyTorch (eager, SDPA, AdamW fused)"
    "train_step_gd_way|25|bench_train_step.py ImageNet-64 step: guided-diffusion's way"
    "gpu_tests|15|the other gpu-marked tests (tests/), cheap modules first, attention last"
    "quickstart|40|torchrun -m fastdiff.train --precision bf16 (SIGTERM 20 s before the limit: checkpoint, exit)"
    "report|5|final benchmarks/report.py: bench.json, results.md, speedups.png"
)
TRAIN_STEP_NODE="benchmarks/bench_train_step.py::test_gpu_train_step_imagenet64"
REPORT_TIMEOUT_S=4            # + 1 s kill: within the final report's 5 s + grace
QUICKSTART_TERM_MARGIN_S=20   # the trainer's SIGTERM path: finish the step, checkpoint, exit

SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

# ---- the plan -------------------------------------------------------------------------------
plan_name() { echo "${1%%|*}"; }
plan_what() { local rest=${1#*|}; echo "${rest#*|}"; }
plan_limit() {  # the planned limit of PLAN entry $1, or its <NAME>_LIMIT_S override
    local name rest var
    name=$(plan_name "$1"); rest=${1#*|}; var="${name^^}_LIMIT_S"
    echo "${!var:-${rest%%|*}}"
}

selected_entries() {  # the PLAN entries SECTIONS selects (all by default), in plan order
    local entry
    for entry in "${PLAN[@]}"; do
        if [ -z "${SECTIONS:-}" ] || [[ " $SECTIONS " == *" $(plan_name "$entry") "* ]]; then
            echo "$entry"
        fi
    done
}

check_sections() {
    local name entry known
    for name in ${SECTIONS:-}; do
        known=0
        for entry in "${PLAN[@]}"; do [ "$(plan_name "$entry")" = "$name" ] && known=1; done
        if [ "$known" = 0 ]; then
            echo "gpu_suite: unknown section '$name' in SECTIONS; known: $(for e in "${PLAN[@]}"; do printf '%s ' "$(plan_name "$e")"; done)" >&2
            exit 2
        fi
    done
}

total_limit() {
    local entry total=0
    while IFS= read -r entry; do
        total=$(( total + $(plan_limit "$entry") + GRACE_S ))
    done < <(selected_entries)
    echo "$total"
}

print_plan() {
    local entry count=0 total
    echo "fastdiff gpu_suite plan: SIGINT at each limit, SIGKILL ${GRACE_S} s later; time a section"
    echo "leaves unused passes to the next. Override a limit with <SECTION>_LIMIT_S."
    printf '  %-26s %6s  %s\n' section limit runs
    while IFS= read -r entry; do
        printf '  %-26s %4s s  %s\n' "$(plan_name "$entry")" "$(plan_limit "$entry")" "$(plan_what "$entry")"
        count=$(( count + 1 ))
    done < <(selected_entries)
    printf '  %-26s %4s s  %s\n' "kill grace" $(( count * GRACE_S )) "${GRACE_S} s after each of the $count sections"
    total=$(total_limit)
    if [ "$total" -gt "$MAX_TOTAL_S" ]; then
        echo "WARNING: the total exceeds ${MAX_TOTAL_S} s (the GPU command's budget)" >&2
    fi
    echo "total limit: $total s"
}

# ---- section bodies (each runs in its own process: bash gpu_suite.sh --section NAME) ----------
section_env() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi
    "$PY" - <<'EOF'
import platform
import shutil

import torch

try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
versions = (f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"triton {triton_version}, nvcc {'on PATH' if shutil.which('nvcc') else 'not on PATH'}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
           f"capability {p.major}.{p.minor}")
else:
    gpu = "none visible to torch"
print(versions)
print(f"SUMMARY: GPU {gpu}; {versions}")
EOF
}

section_install() {
    # Offline machine: no index, no version check (either would wait on the network).
    FASTDIFF_SKIP_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation --no-index \
        --disable-pip-version-check -e . >>"$OUT/install.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/install.log"
    [ $rc = 0 ] && echo "SUMMARY: package installed (extension skipped: built in build_ext)" \
                || echo "SUMMARY: pip install failed (exit $rc): see install.log"
    return $rc
}

section_build_ext() {
    # setup.py reports a failed compile and carries on (BuildExtensionOrWarn): the loader
    # probe below is the judge, and it builds just in time if this left no library.
    echo "=== setup.py build_ext --inplace" >>"$OUT/install.log"
    "$PY" setup.py build_ext --inplace >>"$OUT/install.log" 2>&1
    echo "setup.py build_ext: exit $?"
    grep -E "^fastdiff: |error" "$OUT/install.log" | tail -n 8
    "$PY" - <<'EOF'
import logging
import sys

import torch

logging.basicConfig(level=logging.INFO, format="%(message)s")
from fastdiff.optim import _ext  # noqa: E402

available = _ext.extension_available()
cuda = available and _ext.has_cuda_kernels()
need_cuda = torch.cuda.is_available()
print("SUMMARY: extension " + ("loaded" if available else "NOT available: foreach fallback")
      + ("; CUDA kernels " + ("yes" if cuda else "NO") if need_cuda else "; no GPU here"))
sys.exit(0 if available and (cuda or not need_cuda) else 1)
EOF
}

section_smoke() {
    "${PYTEST[@]}" tests/test_gpu_smoke.py
}

run_benchmark() {  # pytest-benchmark on the given modules / node ids; JSON to $OUT/parts
    local marker=()
    [ "$DRY_RUN" = 1 ] || marker=(-m gpu)  # the CPU benchmarks measure CI's machine, not this
    mkdir -p "$OUT/parts"
    "${PYTEST[@]}" "$@" --benchmark-only --benchmark-json="$OUT/parts/$SECTION.json" "${marker[@]}"
}

section_bench_group_norm_silu() { run_benchmark benchmarks/bench_group_norm_silu.py; }
section_bench_attention() { run_benchmark benchmarks/bench_attention.py; }
section_bench_adam_ema() { run_benchmark benchmarks/bench_adam_ema.py; }
section_train_step_fastdiff() {
    local cpu=()  # the dry run's end-to-end number: the CPU comparison with GD's way
    [ "$DRY_RUN" = 1 ] && cpu=(benchmarks/bench_train_step.py::test_cpu_train_step_32px)
    run_benchmark "${cpu[@]}" "$TRAIN_STEP_NODE[fastdiff]"
}
section_train_step_stock_pytorch() { run_benchmark "$TRAIN_STEP_NODE[stock_pytorch]"; }
section_train_step_gd_way() { run_benchmark "$TRAIN_STEP_NODE[gd_way]"; }

section_gpu_tests() {
    # Only files with gpu tests (collecting all of tests/ takes a while), in an order that
    # puts the quick ones first: a cut-off then costs the slow compiles, not everything.
    local first=(tests/test_fused_adam_ema.py tests/test_group_norm_silu.py) last=(tests/test_attention.py)
    local files=() f
    for f in "${first[@]}"; do [ -f "$f" ] && files+=("$f"); done
    for f in $(grep -l -E "pytest\.mark\.gpu|pytestmark.*gpu" tests/test_*.py); do
        [[ " ${first[*]} ${last[*]} tests/test_gpu_smoke.py " == *" $f "* ]] || files+=("$f")
    done
    for f in "${last[@]}"; do [ -f "$f" ] && files+=("$f"); done
    "${PYTEST[@]}" -m gpu "${files[@]}"
}

section_quickstart() {
    # The README's main job with --precision bf16 in a throwaway run folder. SIGTERM comes
    # QUICKSTART_TERM_MARGIN_S before the section's limit: the trainer finishes its step,
    # checkpoints and exits, so the log shows how far it got. The signal goes to torchrun
    # (it forwards it to its worker) from a sleeper, not a nested `timeout`, so that the
    # section's own limit still reaches every process.
    local run="$WORK/quickstart" term_at=$(( SECTION_LIMIT_S - QUICKSTART_TERM_MARGIN_S ))
    [ "$term_at" -ge 10 ] || term_at=$(( SECTION_LIMIT_S / 2 ))
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m fastdiff.train \
        --log_dir "$run" --precision bf16 >"$OUT/quickstart.log" 2>&1 &
    local pid=$!
    ( sleep "$term_at" && touch "$WORK/quickstart.term" && kill -TERM "$pid" ) >/dev/null 2>&1 &
    local sleeper=$!
    wait "$pid"
    local rc=$?
    kill "$sleeper" 2>/dev/null
    grep -E "kernels:|model wrapping|precision:|img/s|training (finished|stopped)|Error|error" \
        "$OUT/quickstart.log" | tail -n 12
    [ -f "$run/samples_grid.png" ] && cp "$run/samples_grid.png" "$OUT/quickstart_grid.png"
    local outcome last
    outcome=$(grep -oE "training (finished|stopped) at step [0-9]+" "$OUT/quickstart.log" | tail -n 1)
    last=$(grep -E "img/s" "$OUT/quickstart.log" | tail -n 1 | sed -E 's/^.*\] *//' | cut -c1-150)
    if [ -f "$WORK/quickstart.term" ] && [[ "$outcome" == "training stopped"* ]]; then
        rc=0  # our own SIGTERM, and the trainer checkpointed and stopped as it should
        outcome="$outcome (the suite's SIGTERM at ${term_at} s)"
    fi
    echo "SUMMARY: exit $rc; ${outcome:-no end of training in the log}${last:+; last metrics: $last}"
    return $rc
}

section_report() {
    # Here the section's own limit bounds the report (the chart imports matplotlib).
    REPORT_TIMEOUT_S=$SECTION_LIMIT_S write_report --png "$OUT/speedups.png"
    local rows
    rows=$(grep -c '^| test' "$OUT/results.md" 2>/dev/null)
    echo "SUMMARY: ${rows:-0} benchmark rows in results.md"
}

# ---- the runner (parent process) ------------------------------------------------------------
write_report() {  # merge $OUT/parts into bench.json, rewrite results.md (extra args: report.py's)
    local inputs=() part
    [ -s "$OUT/bench.json" ] && inputs+=("$OUT/bench.json")
    for part in "$OUT"/parts/*.json; do
        [ -s "$part" ] && inputs+=("$part")
        [ -e "$part" ] && [ ! -s "$part" ] && rm -f "$part"  # every benchmark skipped
    done
    # Bounded: between sections its time comes out of the next section's, and it must stay
    # under the final report's planned limit + grace so that the plan's total holds.
    timeout -k 1 "$REPORT_TIMEOUT_S" "$PY" benchmarks/report.py "${inputs[@]}" \
        --sections "$WORK/sections.tsv" --merge-json "$OUT/bench.json" --remove-merged \
        --md "$OUT/results.md" "$@" >/dev/null
    rmdir "$OUT/parts" 2>/dev/null
    return 0
}

skip_reason() {  # why section $1 does not run in this mode (empty: it runs)
    if [ "$DRY_RUN" = 1 ]; then
        case $1 in
            install|build_ext) echo "dry run: nothing is installed or built" ;;
            quickstart) echo "dry run: the quickstart is a GPU job here (~5 min on 2 CPU cores)" ;;
        esac
    fi
}

record() {  # name status seconds limit note -> one line of the section log
    local note=${5//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${note:0:200}" >>"$WORK/sections.tsv"
}

section_note() {  # the section's SUMMARY line, else pytest's result line, from its log
    local log=$1 line
    line=$(grep -E '^SUMMARY: ' "$log" | tail -n 1)
    if [ -n "$line" ]; then
        echo "${line#SUMMARY: }"
    else
        grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' "$log" | tail -n 1
    fi
}

run_section() {  # name planned-limit deadline what
    local name=$1 planned=$2 deadline=$3 what=$4 reason left start rc status
    local log="$WORK/section-$name.log"
    reason=$(skip_reason "$name")
    echo
    if [ -n "$reason" ]; then
        echo "=== $name: skipped ($reason)"
        record "$name" skipped 0 "$planned" "$reason"
        return
    fi
    left=$(( deadline - $(date +%s) - GRACE_S ))
    if [ "$left" -lt "$MIN_SECTION_S" ]; then
        echo "=== $name: NOT RUN (${left} s left of the suite's time)"
        record "$name" "not run" 0 "$planned" "the suite's time was spent"
        FAILED+=("$name: not run (time spent)")
        return
    fi
    echo "=== $name (limit ${left} s, planned ${planned} s): $what"
    start=$(date +%s)
    : >"$log"  # exists before the streamer opens it
    # Output to a file, streamed by tail: a process the section leaves behind (a compile
    # worker, a torchrun worker in its own session) cannot hold a pipe open and stall us.
    SECTION=$name SECTION_LIMIT_S=$left timeout -s INT -k "$GRACE_S" "$left" \
        bash "$SCRIPT" --section "$name" >"$log" 2>&1 &
    local runner=$!
    tail -n +1 -s 0.2 -f --pid="$runner" "$log" &
    local streamer=$!
    wait "$runner"
    rc=$?
    wait "$streamer"
    local seconds=$(( $(date +%s) - start ))
    case $rc in
        0) status=ok ;;
        5) status="nothing selected" ;;
        124|137) status="STOPPED at its ${left} s limit"; FAILED+=("$name: stopped at ${left} s") ;;
        *) status="FAILED (exit $rc)"; FAILED+=("$name: exit $rc") ;;
    esac
    echo "=== $name: $status (${seconds} s)"
    record "$name" "$status" "$seconds" "$left" "$(section_note "$log")"
}

main() {
    echo "fastdiff gpu_suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), $( [ "$DRY_RUN" = 1 ] && echo 'DRY RUN (CPU)' || echo 'GPU run'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), total limit $(total_limit) s"
    local suite_start deadline entry name planned
    suite_start=$(date +%s)
    deadline=$suite_start
    while IFS= read -r entry; do
        name=$(plan_name "$entry")
        planned=$(plan_limit "$entry")
        deadline=$(( deadline + planned + GRACE_S ))
        run_section "$name" "$planned" "$deadline" "$(plan_what "$entry")"
        # Every section but the final report is followed by a report (~0.3 s), which the
        # next section's deadline absorbs.
        [ "$name" = report ] || write_report
    done < <(selected_entries)

    echo
    echo "=== summary: $(( $(date +%s) - suite_start )) s in all"
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "every section passed or was skipped on purpose"
    else
        printf 'FAILED: %s\n' "${FAILED[@]}"
    fi
    echo
    [ -f "$OUT/results.md" ] && cat "$OUT/results.md"
    [ ${#FAILED[@]} -eq 0 ]
}

# ---- entry --------------------------------------------------------------------------------
case "${1:-}" in
    --plan) check_sections; print_plan; exit 0 ;;
    --section) "section_$2"; exit $? ;;  # DRY_RUN, OUT, WORK: exported by the parent
    --dry-run) DRY_RUN=1 ;;
    "") DRY_RUN=0 ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh --plan | OUT=<dir> bash benchmarks/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder for the results}"
check_sections
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)  # absolute: sections run from the repository root
WORK=$(mktemp -d /tmp/fastdiff-gpu-suite.XXXXXX)  # section logs, quickstart run: not in $OUT
trap 'rm -rf "$WORK"' EXIT  # what matters was copied to $OUT
: >"$WORK/sections.tsv"
export OUT WORK PY DRY_RUN
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastdiff-inductor-cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # parallel compile of the extension (ninja)
FAILED=()
# A pipe, not a process substitution: the script must not end before tee has written all.
# Sections write to files (see run_section), so nothing left behind can hold this pipe open.
main 2>&1 | tee -a "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
