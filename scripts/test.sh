#!/usr/bin/env bash
# The tests on a fresh machine: set up, build, and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd build
ctest --output-on-failure -j2 --timeout 600 "$@"
