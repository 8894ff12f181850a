#!/usr/bin/env bash
# The article's run_autoglm_server.sh: load the backbone, the vision and speech encoders and their
# adapters, then start the OpenAI-compatible API on 0.0.0.0:8000 (logs "Model loaded successfully",
# then "Uvicorn running on http://0.0.0.0:8000"). Pass --model DIR for a checkpoint (default: the
# nano preset with random weights) and any other `autoglm-fast serve` option, e.g.
#   scripts/run_autoglm_server.sh --model /models/AutoGLM-Phone-9B --api-key "$KEY"
set -euo pipefail
exec autoglm-fast serve "$@"
