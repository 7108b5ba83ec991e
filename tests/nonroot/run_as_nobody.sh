#!/usr/bin/env bash
# Runs the integration tests as an unprivileged user: samepage must work
# without root (no /dev/userfaultfd, no sysfs). Exit 77 = skipped.
set -euo pipefail
build_dir=$1
if [ "$(id -u)" -ne 0 ]; then
  echo "skipped: already unprivileged (the normal run covers it)"; exit 77
fi
if ! command -v setpriv >/dev/null || ! id nobody >/dev/null 2>&1; then
  echo "skipped: needs setpriv and a 'nobody' user"; exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$build_dir"/tests/integration_tests "$build_dir"/libsamepage.so* "$work"/
chmod -R a+rX "$work"
chmod a+x "$work"
cd "$work"
exec setpriv --reuid=nobody --regid=nogroup --clear-groups \
  env LD_LIBRARY_PATH="$work" ./integration_tests
