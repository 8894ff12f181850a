#!/usr/bin/env bash
# One command for a lent CUDA GPU: the kernel and engine tests compiled for real (GPU-only cases
# included: bf16 dots, real-shape checks, CUDA-graph capture), then the benchmark suites.
# Writes logs, JSON and Markdown (and plots, where matplotlib is installed) to $OUT or the folder given.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# (SHAPES=small PYTHON=.venv/bin/python runs the same plumbing on a CPU in a minute or two: a dry run.)
# Budget: under 8 minutes - tests 130 s, e2e 190 s, kernels 130 s, each a time box; the suites
# rewrite their JSON after each row, so a stage cut short still leaves what it measured. No downloads:
# the checkout is installed into the image's Python without dependencies. The commit comes from git, else from a .commit file.
# Exit status 1 when a stage fails, and when a CUDA-graph capture fell back to eager decoding in any
# benchmark row (the report's --require-graphs; the line "CUDA GRAPHS FELL BACK" says which rows).
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
stage() { echo "== $1 ($((SECONDS - start)) s in)" | tee -a "$OUT/stages.log"; }

stage install
# pyproject.toml names setuptools' own PEP 660 backend: offline, pip must not fall back to `setup.py develop`.
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
  || "$PY" -m pip install -q --no-build-isolation --no-deps . >>"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${AUTOGLM_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
} | tee "$OUT/env.txt"

status=0
STAGES="${STAGES:-tests e2e kernels}"  # a rerun names only what it needs, e.g. STAGES=tests
want() { [[ " $STAGES " == *" $1 "* ]]; }
if want tests; then
stage tests
# Test files that need no optional extras (the image has no fastapi, maybe no transformers/Pillow);
# spread over processes where pytest-xdist is installed: Triton's compiles are the time, on the CPU.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${WORKERS:-12}")
# SIGINT at the time box: pytest still prints its failures and writes the JUnit XML.
timeout -s INT -k 20 "${TESTS_S:-130}" "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -rfE --tb=short \
  "${XDIST[@]}" --durations=15 tests/test_kernel_*.py \
  tests/test_real_shapes.py tests/test_fast_modules.py tests/test_fast_backbone.py tests/test_paged_cache.py \
  tests/test_engine.py tests/test_engine_bf16.py tests/test_sampling.py tests/test_glm4v_fast_vision.py \
  tests/test_decode_step.py tests/test_mixed_step.py tests/test_prefix_cache.py tests/test_encoder_graphs.py \
  tests/test_piecewise_graphs.py --junitxml="$OUT/pytest.xml" \
  >"$OUT/pytest.log" 2>&1 || status=1
tail -n 25 "$OUT/pytest.log"
fi

BENCH=("$PY" -m autoglm_fast.benchmarks --shapes "${SHAPES:-real}")
# e2e first: it carries the decode and TTFT targets (SPEC §4), both families (the released one: an agent step).
if want e2e; then
  stage "e2e suite"
  timeout 190 "${BENCH[@]}" --suite e2e --json "$OUT/e2e.json" >"$OUT/e2e.log" 2>&1 || status=1
fi
# torch.compile's default mode here: max-autotune on every case would not fit the budget (run it by hand).
if want kernels; then
  stage "kernels suite"
  timeout 130 "${BENCH[@]}" --suite kernels --compile-mode default --json "$OUT/kernels.json" \
    >"$OUT/kernels.log" 2>&1 || status=1
fi

stage report
PLOT=()
"$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/plots")
parts=()
for f in "$OUT/e2e.json" "$OUT/kernels.json"; do [ -s "$f" ] && parts+=("$f"); done
if [ ${#parts[@]} -gt 0 ]; then
  "$PY" -m autoglm_fast.benchmarks --load "${parts[@]}" --json "$OUT/results.json" --require-graphs \
    --markdown "$OUT/results.md" "${PLOT[@]}" >"$OUT/report.log" 2>"$OUT/report.err" || status=1
  cat "$OUT/results.md"
  tee -a "$OUT/stages.log" <"$OUT/report.err"  # failed rows, CUDA-graph fallbacks: on stdout and in the log
fi
stage "done (status $status)"
exit $status
