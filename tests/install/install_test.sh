#!/usr/bin/env bash
# cmake --install into a scratch prefix, then build and run a consumer project
# with find_package(samepage), and run the installed command.
set -euo pipefail
build_dir=$1
src_dir=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
test -x "$work/prefix/bin/samepage"
test -f "$work/prefix/include/samepage/engine.h"
"$work/prefix/bin/samepage" version
cmake -S "$src_dir/consumer" -B "$work/consumer" \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/consumer" >/dev/null
LD_LIBRARY_PATH="$work/prefix/lib" "$work/consumer/consumer"
