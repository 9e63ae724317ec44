#!/usr/bin/env bash
# What a session with a lent GPU runs first, in steps that each fit one 10-minute device command
# (the device machine has torch/triton/torchvision but no registry access, so no install step).
#   bash benchmarks/gpu_session.sh tests     # the test suite on native Triton
#   bash benchmarks/gpu_session.sh check     # fusedskip check at U-Net shapes
#   bash benchmarks/gpu_session.sh ops       # op benchmarks (quick shapes), results merged into one file
#   bash benchmarks/gpu_session.sh models    # AddUNet and converted U-Nets, merged into the same file
# Results land in benchmarks/results/<device>/ (commit them with the device name in the message).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case "${1:-}" in
  tests)  python -m pytest -q -x tests --ignore=tests/test_gpu_compile.py ;;
  check)  python -m fusedskip.selfcheck --full ;;
  ops)    python -m benchmarks --quick --name gpu-quick --merge \
            --cases gated_skip,gn_silu,bn_relu,bn_relu_eval,skip_gn_silu,skip_bn_relu ;;
  models) python -m benchmarks --quick --name gpu-quick --merge \
            --cases conv_bn_relu,conv_gn_silu,addunet,convert_plain_unet,convert_smp_unet ;;
  *) echo "usage: $0 tests|check|ops|models" >&2; exit 2 ;;
esac
