#!/usr/bin/env bash
# One command for a lent CUDA GPU: GPU tests + kernel correctness at real shapes + microbenchmarks.
# Writes logs and JSON to $OUT (or the folder given as $1). Budget: well under 8 minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET

"$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
} | tee "$OUT/env.txt"

status=0
# Kernel tests: every test file that needs no optional extras (transformers/fastapi may be absent there).
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_*.py tests/test_fast_modules.py \
  tests/test_fast_backbone.py tests/test_paged_cache.py tests/test_model.py tests/test_config.py \
  tests/test_engine.py tests/test_sampling.py \
  --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log" || status=1
timeout 120 "$PY" -m autoglm_fast.benchmarks.adapter --json "$OUT/adapter.json" 2>&1 | tee "$OUT/adapter.log" || status=1
timeout 150 "$PY" -m autoglm_fast.benchmarks.backbone --json "$OUT/backbone.json" 2>&1 | tee "$OUT/backbone.log" || status=1
timeout 150 "$PY" -m autoglm_fast.benchmarks.e2e --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" || status=1
exit $status
