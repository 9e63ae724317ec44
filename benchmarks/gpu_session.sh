#!/usr/bin/env bash
# The one command a session with a lent GPU runs (see benchmarks/gpu_session.py):
#   bash benchmarks/gpu_session.sh OUT_DIR [--budget-s 450] [--no-compile]
# Everything lands in OUT_DIR (commit it with the device name in the message).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python -m benchmarks gpu-session "$@"
