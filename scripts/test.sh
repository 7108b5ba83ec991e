#!/usr/bin/env bash
# The tests on a fresh machine: set up, build, and run the whole suite; then
# the same suite once more in a Debug build, where the core checks all its
# invariants after every batch the scanner runs on real memory and a
# destroyed object's virtual call aborts instead of working by luck.
# SAMEPAGE_SKIP_DEBUG=1 runs the release suite alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
(cd build && ctest --output-on-failure -j2 --timeout 600 "$@")
[ "${SAMEPAGE_SKIP_DEBUG:-0}" = 1 ] && exit 0
guest_dir=${SAMEPAGE_GUEST_KERNEL_DIR:-/var/cache/samepage/guest-kernel}
cmake -S . -B build-debug -DCMAKE_BUILD_TYPE=Debug \
  -DSAMEPAGE_GUEST_KERNEL_DIR="$guest_dir" >/dev/null
cmake --build build-debug -j"$(nproc)"
cd build-debug
ctest --output-on-failure -j2 --timeout 600 "$@"
