#!/usr/bin/env bash
# Here, before a device run: the wheels benchmarks/gpu.sh installs there (Python 3.12, no internet there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
ls -la .whl
