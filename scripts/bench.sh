#!/usr/bin/env bash
# Set up, build, and run samepage side by side with kernel KSM: one workload
# program (bench/workload.c, kernel KSM ABI only) run natively and under
# `samepage run`, alternating. The kernel side needs a writable
# /sys/kernel/mm/ksm (root) and is skipped with a message otherwise; it
# restores every knob it changes. Extra arguments go to samepage_compare
# (--scale, --reps, --only, --timeout, --list). Timings are only comparable on
# an otherwise idle machine: the load average is printed with the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./build/bench/samepage_compare "$@"
