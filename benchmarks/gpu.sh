#!/usr/bin/env bash
# On the device machine (python3 there holds torch; nothing can be downloaded): install the carried
# wheels (.whl: diffusers and importlib_metadata, fetched here with benchmarks/gpu_wheels.sh) and maskc
# itself, then run benchmarks/gpu.py, which writes its table under $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 benchmarks/gpu.py "$@"
