#!/usr/bin/env bash
# One command for a lent CUDA GPU: the headline benchmark rows, the kernel and engine tests compiled for
# real (GPU-only cases included: bf16 dots, real-shape checks, CUDA-graph capture), then the other rows.
# Writes logs, JSON and Markdown (and plots, where matplotlib is installed) to $OUT or the folder given.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# (SHAPES=small PYTHON=.venv/bin/python STAGES="headline e2e kernels" runs the same plumbing on a CPU: a dry
# run. COMPILE_MODE sets the kernel rows' torch.compile baselines: default; none in a dry run.)
#
# Stages, most important first, each a time box (seconds; env overrides in brackets), all inside 8 minutes:
#   install    pip install of the checkout, env.txt                    (not boxed: ~10-20 s)
#   headline   e2e decode b1 (ours, graphed) at the short context, 4k, 32k, and int8 / int4 beside the
#              unquantized engine; then decode attention at 4k / 32k (batch 1, 8, 32) and causal prefill
#              attention at 4k (three more 9B engines than before: 220)          220 [HEADLINE_S]
#   tests      the GPU test files                                                 100 [TESTS_S] (+20 to stop)
#   e2e        the other e2e rows: ours' TTFT and throughput, the no-graphs and reference baselines,
#              then GLM-4.1V and the serving rows (those rarely fit: run STAGES=e2e E2E_S=400 for them)
#                                                                                  60 [E2E_S]
#   kernels    the other kernel rows: RoPE / RMSNorm / SwiGLU first, decode attention at 1k / 16k,
#              prefill attention at 1k / 8k, the int8 / int4 GEMV and GEMM rows, the adapter rows and
#              the gated fusion                                                   50 [KERNELS_S]
#   report     all JSON merged (a row measured twice: the later one) into results.json / results.md
# A stage never runs past BUDGET_S (470) minus 20 s kept for the report: a late start shrinks its box,
# and a stage with under 15 s left is skipped. The suites rewrite their JSON after each row, so a stage
# cut short keeps what it measured. stages.log has each stage's start, duration and exit status.
# No downloads: the checkout is installed into the image's Python without dependencies. The commit
# comes from git, else from a .commit file.
# Exit status 1 when a stage fails (a failed test or row; a time box that cuts the tests or the headline
# rows; not one that cuts the e2e or kernels stage, whose rows are more than their boxes hold), and when
# a CUDA-graph capture fell back to eager decoding in any benchmark row (the report's --require-graphs;
# the line "CUDA GRAPHS FELL BACK" says which rows).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
# The suites read the commit from git (marking a dirty tree); a copy without .git names it in .commit.
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -z "${AUTOGLM_FAST_COMMIT:-}" ] && [ -f .commit ]; then
  export AUTOGLM_FAST_COMMIT="$(cat .commit)"
fi
start=$SECONDS
BUDGET=${BUDGET_S:-470}
current="" since=$SECONDS
stage() {  # closes the stage before (its duration) and opens the next
  [ -n "$current" ] && echo "   $current took $((SECONDS - since)) s" | tee -a "$OUT/stages.log"
  current="$1" since=$SECONDS
  echo "== $1 ($((SECONDS - start)) s in)" | tee -a "$OUT/stages.log"
}
box() {  # box SECONDS [GRACE]: that, or what the budget allows after the report's 20 s and GRACE (0: skip)
  local left=$((BUDGET - 20 - ${2:-0} - (SECONDS - start)))
  local s=$(($1 < left ? $1 : left))
  echo $((s < 15 ? 0 : s))
}
# run_boxed NAME SECONDS CMD...: CMD under a time box. A cut is logged; it fails the check for the tests
# and the headline rows, not for the e2e and kernels stages, which hold more rows than their boxes.
run_boxed() {
  local name="$1" secs="$2" rc
  shift 2
  if [ "$secs" -eq 0 ]; then
    echo "   $name skipped: the budget is spent" | tee -a "$OUT/stages.log"
    return 0
  fi
  "$@"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "   $name: time box of $secs s reached (rows measured so far are kept)" | tee -a "$OUT/stages.log"
    [ "$name" = tests ] || [ "$name" = headline ] && status=1
  elif [ $rc -ne 0 ]; then
    echo "   $name: exit status $rc" | tee -a "$OUT/stages.log"
    status=1
  fi
}

stage install
# pyproject.toml names setuptools' own PEP 660 backend: offline, pip must not fall back to `setup.py develop`.
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
  || "$PY" -m pip install -q --no-build-isolation --no-deps . >>"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${AUTOGLM_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
} | tee "$OUT/env.txt"

status=0
STAGES="${STAGES:-headline tests e2e kernels}"  # a rerun names only what it needs, e.g. STAGES=tests
want() { [[ " $STAGES " == *" $1 "* ]]; }
BENCH=("$PY" -m autoglm_fast.benchmarks --shapes "${SHAPES:-real}")
# torch.compile's default mode for the kernel baselines: max-autotune on every case would not fit (run it
# by hand). None in a small-shapes dry run: on a CPU each case would compile C++ for tens of seconds.
# The e2e suite ignores it.
KERNEL_OPTS=(--compile-mode "${COMPILE_MODE:-$([ "${SHAPES:-real}" = small ] && echo none || echo default)}")

if want headline; then
  stage headline
  s=$(box "${HEADLINE_S:-220}")
  rm -f "$OUT/headline.json"  # a run cut before its first row must not leave an older run's rows behind
  run_boxed headline "$s" timeout "$s" "${BENCH[@]}" --suite e2e kernels --part headline "${KERNEL_OPTS[@]}" \
    --json "$OUT/headline.json" >"$OUT/headline.log" 2>&1
fi

if want tests; then
  stage tests
  # Test files that need no optional extras (the image has no fastapi, maybe no transformers/Pillow);
  # spread over processes where pytest-xdist is installed: Triton's compiles are the time, on the CPU.
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${WORKERS:-12}")
  s=$(box "${TESTS_S:-100}" 20)
  # SIGINT at the time box: pytest still prints its failures and writes the JUnit XML.
  run_boxed tests "$s" timeout -s INT -k 20 "$s" "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -rfE \
    --tb=short "${XDIST[@]}" --durations=15 tests/test_kernel_*.py \
    tests/test_real_shapes.py tests/test_fast_modules.py tests/test_fast_backbone.py tests/test_paged_cache.py \
    tests/test_engine.py tests/test_engine_bf16.py tests/test_sampling.py tests/test_glm4v_fast_vision.py \
    tests/test_decode_step.py tests/test_mixed_step.py tests/test_prefix_cache.py tests/test_encoder_graphs.py \
    tests/test_piecewise_graphs.py tests/test_launch_count.py tests/test_quantized_models.py --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
  # pytest's own failures (exit 1) were counted by run_boxed; its summary is the log's tail
  tail -n 25 "$OUT/pytest.log"
fi

if want e2e; then
  stage e2e
  s=$(box "${E2E_S:-60}")
  rm -f "$OUT/e2e.json"
  run_boxed e2e "$s" timeout "$s" "${BENCH[@]}" --suite e2e --part rest --json "$OUT/e2e.json" \
    >"$OUT/e2e.log" 2>&1
fi

if want kernels; then
  stage kernels
  s=$(box "${KERNELS_S:-50}")
  rm -f "$OUT/kernels.json"
  run_boxed kernels "$s" timeout "$s" "${BENCH[@]}" --suite kernels --part rest "${KERNEL_OPTS[@]}" \
    --json "$OUT/kernels.json" >"$OUT/kernels.log" 2>&1
fi

stage report
PLOT=()
"$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/plots")
parts=()
for f in "$OUT/headline.json" "$OUT/e2e.json" "$OUT/kernels.json"; do [ -s "$f" ] && parts+=("$f"); done
if [ ${#parts[@]} -gt 0 ]; then
  "$PY" -m autoglm_fast.benchmarks --load "${parts[@]}" --json "$OUT/results.json" --require-graphs \
    --markdown "$OUT/results.md" "${PLOT[@]}" >"$OUT/report.log" 2>"$OUT/report.err" || status=1
  cat "$OUT/results.md"
  tee -a "$OUT/stages.log" <"$OUT/report.err"  # failed rows, CUDA-graph fallbacks: on stdout and in the log
fi
stage "done (status $status)"
exit $status
