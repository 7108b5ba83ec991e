#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, and run `samepage demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./build/samepage demo "$@"
