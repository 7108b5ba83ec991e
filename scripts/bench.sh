#!/usr/bin/env bash
# Set up, build, and run samepage side by side with kernel KSM on the same
# workloads (needs root for the kernel side; skipped otherwise). Extra
# arguments go to samepage_compare (--scale, --reps, --only, --timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./build/bench/samepage_compare "$@"
